"""PromptSource templates, read from their YAML files and rendered as PromptSource 0.2.3 renders them.

The SMEAR authors prompt every GLUE example with PromptSource templates (``DatasetTemplates("glue", task)``). The
``promptsource`` package (0.2.3) cannot be imported on Python >= 3.10 because it imports ``pkg_resources`` at import
time, so this module never imports it: it only locates the installed package's ``templates/`` folder and reads
``templates/<dataset>/<subset>/templates.yaml`` itself. Rendering follows ``promptsource.templates.Template``:

* the template's jinja is rendered with a plain :class:`jinja2.Environment` that has PromptSource's extras
  (the ``zip`` global and the ``choice`` and ``most_frequent`` filters);
* every ``}}`` is first rewritten to ``| string | truncate(2048) }}``, so each substituted value is cut to
  2048 characters (plus Jinja's default leeway of 5) at a word boundary, as PromptSource's ``truncate=True``;
* ``|||`` inside string fields of the example is protected while rendering, the output is split on ``|||`` and
  each part is stripped;
* ``answer_choices`` is rendered from its own jinja expression (without truncation), split on ``|||``, stripped,
  and exposed to the template as the list ``answer_choices``.

Templates are returned sorted by name, the order of PromptSource's ``DatasetTemplates.all_template_names``, which
is the order the authors iterate when they collect the original-task templates.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

__all__ = [
    "BUILTIN_TEMPLATES_DIR",
    "PROMPTSOURCE_INSTALL_HINT",
    "Template",
    "TemplateMetadata",
    "load_templates",
    "original_task_templates",
    "promptsource_templates_dir",
]

BUILTIN_TEMPLATES_DIR: Path = Path(__file__).resolve().parent / "templates"
"""Our own minimal original-task GLUE templates (same layout and YAML format as PromptSource's), for offline use."""

PROMPTSOURCE_INSTALL_HINT = "pip install --no-deps --ignore-requires-python promptsource==0.2.3"

TEMPLATES_FILENAME = "templates.yaml"
TEXT_VARIABLE_MAX_CHARS = 2048
"""PromptSource's truncation length for every substituted jinja variable."""
ANSWER_SEPARATOR = "|||"
# Stands in for "|||" inside example fields while rendering. It has the length of PromptSource's own placeholder
# (32 characters, no spaces), so truncation cuts protected text exactly where PromptSource does.
_PIPE_PLACEHOLDER = "5f0c2b7e9a41d3c86e2f0a9b7d14c3e8"


def _choice(choices: Sequence[Any]) -> Any:
    """PromptSource's ``choice`` filter: a uniformly random element, drawn from Python's global ``random``."""
    return random.choice(choices)


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """PromptSource's ``most_frequent`` filter: every item that has the highest count (``None`` for no items)."""
    if not items:
        return None
    counts = Counter(items).most_common()
    highest = counts[0][1]
    return [item for item, count in counts if count == highest]


def _make_environment() -> jinja2.Environment:
    environment = jinja2.Environment()
    environment.globals["zip"] = zip
    environment.filters["choice"] = _choice
    environment.filters["most_frequent"] = _most_frequent
    return environment


_ENVIRONMENT = _make_environment()


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(source)


def _protect_separator(example: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value.replace(ANSWER_SEPARATOR, _PIPE_PLACEHOLDER) if isinstance(value, str) else value
        for key, value in example.items()
    }


def _restore_separator(text: str) -> str:
    return text.replace(_PIPE_PLACEHOLDER, ANSWER_SEPARATOR)


@dataclass(frozen=True)
class TemplateMetadata:
    """PromptSource's ``!TemplateMetadata``: annotations of one template.

    Attributes:
        original_task: whether the prompt asks for the dataset's original task (the authors keep only these).
        choices_in_prompt: whether the answer choices are spelled out in the prompt.
        metrics: names of the metrics PromptSource suggests for the template.
        languages: language codes (present in PromptSource versions after 0.2.3).
        extra: any other metadata keys found in the YAML, kept verbatim.
    """

    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: list[str] | None = None
    languages: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Template:
    """One PromptSource prompt template (``!Template``).

    Attributes:
        id: the template's UUID string, as stored in the YAML.
        name: the template's name, unique within its dataset/subset.
        jinja: the jinja source; ``|||`` separates the input prompt from the target.
        reference: free-text author or paper reference.
        answer_choices: the raw jinja expression for the ``|||``-separated answer choices, or ``None`` for
            open-ended templates (for example STS-B's, whose target is a number).
        metadata: the template's :class:`TemplateMetadata`.
    """

    id: str
    name: str
    jinja: str
    reference: str = ""
    answer_choices: str | None = None
    metadata: TemplateMetadata = field(default_factory=TemplateMetadata)

    def get_answer_choices_list(self, example: Mapping[str, Any]) -> list[str] | None:
        """Renders the answer choices for ``example`` (``None`` when the template has no answer choices)."""
        if self.answer_choices is None:
            return None
        rendered = _compile(self.answer_choices).render(**_protect_separator(example))
        return [_restore_separator(choice.strip()) for choice in rendered.split(ANSWER_SEPARATOR)]

    def apply(self, example: Mapping[str, Any], truncate: bool = True) -> tuple[str, str]:
        """Renders ``example`` into ``(input_text, target_text)`` exactly as PromptSource 0.2.3's ``Template.apply``.

        Args:
            example: one dataset row (column name to value); it must not contain the key ``answer_choices``.
            truncate: cut every substituted variable to 2048 characters, as PromptSource does by default.

        Raises:
            ValueError: the example has an ``answer_choices`` key, or the rendered text does not split into
                exactly one input and one target (for example an unlabelled row with a template that only emits a
                target for labelled rows).
        """
        if "answer_choices" in example:
            raise ValueError(
                f"Template {self.name!r}: the example contains the reserved key 'answer_choices'; rename that column."
            )
        source = self.jinja
        if truncate:
            source = source.replace("}}", f" | string | truncate({TEXT_VARIABLE_MAX_CHARS}) }}}}")
        rendered = _compile(source).render(
            **_protect_separator(example), answer_choices=self.get_answer_choices_list(example)
        )
        parts = [_restore_separator(part).strip() for part in rendered.split(ANSWER_SEPARATOR)]
        if len(parts) != 2:
            raise ValueError(
                f"Template {self.name!r} rendered {len(parts)} part(s) separated by {ANSWER_SEPARATOR!r}, expected "
                f"an input and a target. Is the example labelled? Rendered text: {rendered[:200]!r}"
            )
        return parts[0], parts[1]


class _TemplateYamlLoader(yaml.SafeLoader):
    """A safe YAML loader that understands PromptSource's ``!Template`` and ``!TemplateMetadata`` tags."""


def _construct_template(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Template:
    fields = loader.construct_mapping(node, deep=True)
    try:
        return Template(
            id=str(fields["id"]),
            name=str(fields["name"]),
            jinja=str(fields["jinja"]),
            reference=fields.get("reference") or "",
            answer_choices=fields.get("answer_choices"),
            metadata=fields.get("metadata") or TemplateMetadata(),
        )
    except KeyError as missing:
        raise yaml.constructor.ConstructorError(
            None, None, f"!Template is missing the field {missing}", node.start_mark
        ) from None


def _construct_metadata(loader: yaml.SafeLoader, node: yaml.MappingNode) -> TemplateMetadata:
    fields = dict(loader.construct_mapping(node, deep=True))
    return TemplateMetadata(
        original_task=fields.pop("original_task", None),
        choices_in_prompt=fields.pop("choices_in_prompt", None),
        metrics=fields.pop("metrics", None),
        languages=fields.pop("languages", None),
        extra=fields,
    )


_TemplateYamlLoader.add_constructor("!Template", _construct_template)
_TemplateYamlLoader.add_constructor("!TemplateMetadata", _construct_metadata)


def promptsource_templates_dir() -> Path | None:
    """The ``templates/`` folder of the installed ``promptsource`` package, found without importing it.

    Returns ``None`` when promptsource is not installed.
    """
    spec = importlib.util.find_spec("promptsource")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / "templates"
        if candidate.is_dir():
            return candidate
    return None


def load_templates(
    dataset: str,
    subset: str | None = None,
    templates_dir: str | os.PathLike[str] | None = None,
) -> list[Template]:
    """Loads every template of a dataset (and subset) from PromptSource-style YAML, sorted by template name.

    Args:
        dataset: the dataset folder name, e.g. ``"glue"``.
        subset: the subset folder name, e.g. ``"rte"``; ``None`` for datasets without subsets.
        templates_dir: a folder laid out like PromptSource's ``templates/``
            (``<templates_dir>/<dataset>/<subset>/templates.yaml``). Defaults to the installed promptsource
            package's templates; :data:`BUILTIN_TEMPLATES_DIR` holds our small offline GLUE set.

    Raises:
        FileNotFoundError: no templates file exists for ``dataset``/``subset`` (the message says how to fix it).
    """
    root = Path(templates_dir) if templates_dir is not None else promptsource_templates_dir()
    name = f"{dataset}/{subset}" if subset else dataset
    if root is None:
        raise FileNotFoundError(
            f"No PromptSource templates for {name!r}: promptsource is not installed. Install it with "
            f"`{PROMPTSOURCE_INSTALL_HINT}`, or pass templates_dir= (for example "
            f"smear_peft.data.prompts.BUILTIN_TEMPLATES_DIR for our small offline GLUE templates)."
        )
    path = root / dataset / subset / TEMPLATES_FILENAME if subset else root / dataset / TEMPLATES_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No templates for {name!r}: {path} does not exist. Pass templates_dir= pointing to a folder laid out as "
            f"<templates_dir>/<dataset>/<subset>/{TEMPLATES_FILENAME}, or install PromptSource's templates with "
            f"`{PROMPTSOURCE_INSTALL_HINT}`."
        )
    with path.open(encoding="utf-8") as stream:
        document = yaml.load(stream, Loader=_TemplateYamlLoader)  # a SafeLoader subclass
    templates = (document or {}).get("templates") or {}
    if not isinstance(templates, Mapping) or not all(isinstance(t, Template) for t in templates.values()):
        raise ValueError(
            f"{path} is not a PromptSource templates file: expected a `templates:` mapping of ids to !Template."
        )
    return sorted(templates.values(), key=lambda template: template.name)


def original_task_templates(templates: Iterable[Template]) -> list[Template]:
    """Keeps the templates whose ``metadata.original_task`` is true, the only ones the SMEAR authors use."""
    return [template for template in templates if template.metadata.original_task is True]
