"""The ``glue_smear`` evaluate metric; its code lives in ``glue_smear.py`` so that ``evaluate.load`` can load this
folder by path."""
