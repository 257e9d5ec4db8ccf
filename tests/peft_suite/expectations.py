"""placeholder"""
def classify(name, params):
    return None
