"""Tests of PromptSource template loading and rendering (smear_peft.data.prompts)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from smear_peft.data import prompts
from smear_peft.data.glue import GLUE_TASKS
from smear_peft.data.prompts import (
    BUILTIN_TEMPLATES_DIR,
    PROMPTSOURCE_INSTALL_HINT,
    Template,
    TemplateMetadata,
    load_templates,
    original_task_templates,
    promptsource_templates_dir,
)
from smear_peft.metrics import LABEL_WORDS

EXAMPLE_YAML = """\
dataset: toy
subset: pairs
templates:
  id-b: !Template
    answer_choices: '{{ label_names[0] }} ||| {{ label_names[1] }}'
    id: id-b
    jinja: '  {{first}} vs {{second}}  |||  {{ answer_choices[label] }}  '
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
      languages:
      - en
      some_future_key: 3
    name: zeta
    reference: ''
  id-a: !Template
    answer_choices: null
    id: id-a
    jinja: '{{ words | most_frequent | join(",") }} {% for a, b in zip(first, second) %}{{a}}{{b}}{% endfor %} ||| x'
    metadata: !TemplateMetadata
      choices_in_prompt: null
      metrics: null
      original_task: false
    name: alpha
    reference: me
"""


@pytest.fixture
def toy_templates_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "toy" / "pairs"
    folder.mkdir(parents=True)
    (folder / "templates.yaml").write_text(EXAMPLE_YAML, encoding="utf-8")
    return tmp_path


def test_loads_yaml_tags_sorted_by_name(toy_templates_dir: Path) -> None:
    zeta_first = load_templates("toy", "pairs", toy_templates_dir)
    assert [template.name for template in zeta_first] == ["alpha", "zeta"]
    alpha, zeta = zeta_first
    assert (alpha.id, alpha.reference, alpha.answer_choices) == ("id-a", "me", None)
    assert zeta.metadata == TemplateMetadata(
        original_task=True,
        choices_in_prompt=False,
        metrics=["Accuracy"],
        languages=["en"],
        extra={"some_future_key": 3},
    )
    assert original_task_templates(zeta_first) == [zeta]


def test_apply_strips_parts_and_renders_answer_choices_from_the_example(toy_templates_dir: Path) -> None:
    zeta = load_templates("toy", "pairs", toy_templates_dir)[1]
    example = {"first": "A", "second": "B", "label": 1, "label_names": ["bad", "good"]}
    assert zeta.get_answer_choices_list(example) == ["bad", "good"]
    assert zeta.apply(example) == ("A vs B", "good")


def test_apply_supports_promptsource_filters_and_zip(toy_templates_dir: Path) -> None:
    alpha = load_templates("toy", "pairs", toy_templates_dir)[0]
    example = {"words": ["b", "a", "b", "a", "c"], "first": "xy", "second": "12"}
    assert alpha.apply(example, truncate=False) == ("b,a x1y2", "x")


def test_apply_protects_the_separator_inside_fields() -> None:
    template = Template(id="t", name="t", jinja="{{ text }} ||| {{ answer_choices[label] }}", answer_choices="a|||b")
    assert template.apply({"text": "left ||| right", "label": 0}) == ("left ||| right", "a")


def test_apply_truncates_each_variable_like_promptsource() -> None:
    template = Template(id="t", name="t", jinja="{{ text }} ||| {{ short }}")
    long_text = "word " * 600  # 3000 characters: over 2048 + Jinja's leeway of 5
    truncated, short = template.apply({"text": long_text, "short": "ok"})
    assert truncated == " ".join(["word"] * 409) + "..."
    assert short == "ok"
    assert template.apply({"text": long_text, "short": "ok"}, truncate=False)[0] == long_text.strip()
    exactly_at_leeway = "a" * 2053
    assert template.apply({"text": exactly_at_leeway, "short": "ok"})[0] == exactly_at_leeway


def test_apply_rejects_reserved_key_and_missing_target() -> None:
    template = Template(id="t", name="t", jinja="{{ text }}{% if label >= 0 %} ||| {{ label }}{% endif %}")
    with pytest.raises(ValueError, match="reserved key 'answer_choices'"):
        template.apply({"text": "x", "label": 0, "answer_choices": []})
    with pytest.raises(ValueError, match="expected an input and a target"):
        template.apply({"text": "x", "label": -1})


def test_missing_templates_error_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="templates_dir=") as error:
        load_templates("glue", "nope", tmp_path)
    assert PROMPTSOURCE_INSTALL_HINT in str(error.value)
    monkeypatch.setattr(prompts, "promptsource_templates_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="promptsource is not installed") as error:
        load_templates("glue", "rte")
    assert PROMPTSOURCE_INSTALL_HINT in str(error.value) and "BUILTIN_TEMPLATES_DIR" in str(error.value)


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_builtin_glue_templates_are_original_task_and_scorable(task: str) -> None:
    templates = load_templates("glue", task, BUILTIN_TEMPLATES_DIR)
    assert len(templates) == 2
    assert original_task_templates(templates) == templates
    assert len({template.id for template in templates}) == 2
    for template in templates:
        choices = template.get_answer_choices_list({"label": 0})
        if task == "stsb":
            assert choices is None
        else:
            assert choices and all(choice.lower() in LABEL_WORDS for choice in choices)


# --- Against the real PromptSource 0.2.3 files and code -------------------------------------------------------------

requires_promptsource = pytest.mark.skipif(
    promptsource_templates_dir() is None, reason=f"promptsource not installed ({PROMPTSOURCE_INSTALL_HINT})"
)

GLUE_EXAMPLES = [
    {
        "sentence": "A fine | film.",
        "sentence1": "The cat sat.",
        "sentence2": "A cat ||| sat down.",
        "question1": "Why?",
        "question2": "How?",
        "premise": "It rains.",
        "hypothesis": "It is wet.",
        "question": "Who?",
        "label": 0,
        "idx": 0,
    },
    {
        "sentence": "word " * 500,
        "sentence1": "x " * 1100,
        "sentence2": "y",
        "question1": "q1 ",
        "question2": " q2",
        "premise": "p",
        "hypothesis": "h",
        "question": "q",
        "label": 1,
        "idx": 7,
    },
]


@requires_promptsource
def test_real_rte_template_renders_the_expected_string() -> None:
    mean = next(t for t in load_templates("glue", "rte") if t.name == "mean")
    example = {"sentence1": "It rains.", "sentence2": "It is wet.", "label": 1, "idx": 0}
    assert mean.apply(example) == ('It rains.\nDoes this mean that "It is wet." is true? A) yes or B) no.', "no")
    stsb_rank = next(t for t in load_templates("glue", "stsb") if t.name == "rank")
    example = {"sentence1": "a", "sentence2": "b", "label": 3.799999952316284, "idx": 0}
    expected_prompt = 'Rate on a scale from 0.0 to 5.0 how similar the sentences "a" and "b" are.'
    assert stsb_rank.apply(example) == (expected_prompt, "3.8")


@pytest.fixture
def promptsource_dataset_templates(monkeypatch: pytest.MonkeyPatch) -> type:
    """PromptSource's own ``DatasetTemplates``, importable once ``pkg_resources`` is stubbed."""
    templates_root = promptsource_templates_dir()
    assert templates_root is not None
    stub = types.ModuleType("pkg_resources")
    stub.resource_filename = lambda package, name: os.path.join(templates_root.parent, name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pkg_resources", stub)
    for name in ("promptsource", "promptsource.templates"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    pytest.importorskip("pandas")  # promptsource.templates imports it
    from promptsource.templates import DatasetTemplates

    yield DatasetTemplates
    for name in ("promptsource", "promptsource.templates"):
        sys.modules.pop(name, None)


@requires_promptsource
@pytest.mark.parametrize("task", [*GLUE_TASKS, "wnli", "ax"])
def test_matches_promptsource_on_every_glue_template(task: str, promptsource_dataset_templates: type) -> None:
    theirs = promptsource_dataset_templates("glue", task)
    ours = load_templates("glue", task)
    assert [template.name for template in ours] == theirs.all_template_names
    for template in ours:
        reference = theirs[template.name]
        assert (template.id, template.answer_choices, template.jinja) == (
            reference.id,
            reference.answer_choices,
            reference.jinja,
        )
        assert template.metadata.original_task == reference.metadata.original_task
        for example in GLUE_EXAMPLES:
            if task == "stsb":
                example = {**example, "label": 2.5999999046325684 + example["label"]}
            expected = reference.apply(example)
            if len(expected) == 2:
                assert list(template.apply(example)) == expected, template.name
            else:  # e.g. MRPC's generate_paraphrase renders nothing for non-paraphrases: we raise instead
                with pytest.raises(ValueError, match="expected an input and a target"):
                    template.apply(example)
            assert template.get_answer_choices_list(example) == reference.get_answer_choices_list(example)
