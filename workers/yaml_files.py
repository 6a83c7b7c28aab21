"""YAML as every file of the project reads it: safe (no tags that build objects), and strict about
duplicate keys, which plain YAML loaders resolve silently by keeping the later value — a spec with two
``n_edits`` lines would run with whichever came last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming one key twice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, whose keys the mapping may override
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictLoader.construct_mapping)


def load_text(text: str) -> Any:
    """Parse YAML text (``yaml.YAMLError`` on bad syntax, a tag, a duplicate key)."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's content, or one ``ValueError`` line naming the file and what is wrong."""
    path = Path(path)
    try:
        return load_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid YAML: nested too deeply") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a YAML file") from None
