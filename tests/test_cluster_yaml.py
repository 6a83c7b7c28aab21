"""cluster.yaml is what `ray up` accepts: Ray's own config preparation and schema validation pass, and
the nodes and the Makefile install the one lock file this suite runs with."""

import copy
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before launching anything (``commands._bootstrap_config``): fill the provider's
    defaults, merge the setup commands, then validate against ``ray-schema.json``."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_validates_the_cluster_config(cluster):
    prepared = validated(cluster)
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and nodes["head"]["max_workers"] == 0
    assert nodes["head"]["resources"].get("GPU", 0) == 0
    workers = [name for name in nodes if name != "head"]
    assert workers and all(nodes[name]["resources"]["GPU"] >= 1 for name in workers)
    assert any(nodes[name]["resources"]["GPU"] >= 2 for name in workers)  # room for a model over two GPUs
    # The shared setup runs first on both kinds of node, then the head's / the workers' own.
    assert prepared["head_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == cluster["setup_commands"]


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(setup_comands=c.pop("setup_commands")),  # a misspelt field
    lambda c: c["available_node_types"]["gpu-1x"]["resources"].update(GPU="one"),  # a resource not a number
    lambda c: c.pop("head_node_type"),
])
def test_the_validation_rejects_a_broken_config(cluster, break_it):
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validated(broken)


LOCK = ROOT / "requirements.lock"
TORCH_CONSTRAINT = ROOT / "lock" / "torch-constraint.txt"


def locked_pins() -> dict[str, str]:
    """Package -> version, from the lock's ``name==version \\`` lines (every one hash-checked)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", LOCK.read_text(), flags=re.M))
    hashed = re.findall(r"^[A-Za-z0-9_.\-]+==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}", LOCK.read_text(), flags=re.M)
    assert len(hashed) == len(pins), "every locked package carries its hashes"
    return {name.lower(): version for name, version in pins.items()}


def test_the_lock_pins_the_whole_stack_and_its_torch_release():
    pins = locked_pins()
    for package in ("ray", "transformers", "accelerate", "pyarrow", "pandas", "safetensors", "setuptools",
                    "pytest", "moto"):
        assert package in pins, package
    assert "torch" not in pins  # installed on its own (CPU here, CUDA on the nodes), see the Makefile
    assert re.fullmatch(r"torch==[0-9.]+", next(line for line in TORCH_CONSTRAINT.read_text().splitlines()
                                                 if line.startswith("torch")))
    # Everything pyproject.toml asks for is in the lock (a dependency added without re-locking fails).
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
        assert name == "torch" or name in pins, f"{name} is in pyproject.toml but not in requirements.lock"


def test_the_environment_under_test_is_the_lock():
    """The suite runs on what the lock pins (``make test`` installs it exactly); a drift fails here."""
    for package, pinned in locked_pins().items():
        if package in {"setuptools", "pip"}:
            continue
        assert version(package) == pinned, f"{package}: installed {version(package)}, locked {pinned}"
    torch_pin = re.search(r"torch==(\S+)", TORCH_CONSTRAINT.read_text()).group(1)
    assert version("torch").split("+")[0] == torch_pin


def install_commands(text: str) -> list[str]:
    return [line for line in text.splitlines() if "install" in line and "apt-get" not in line]


def test_the_makefile_and_every_node_install_from_the_lock(cluster):
    makefile = (ROOT / "Makefile").read_text()
    # The Makefile: torch from the constraint file, then the lock hash-checked without resolution.
    assert "TORCH_PIN ?= $(shell grep -E '^torch==' lock/torch-constraint.txt)" in makefile
    assert re.search(r"^UV\s*:=.*uv pip install", makefile, flags=re.M)
    lock_line = next(line for line in makefile.splitlines() if "-r requirements.lock" in line)
    assert lock_line.strip().startswith("$(UV)") and "--require-hashes" in lock_line and "--no-deps" in lock_line
    assert re.search(r"--no-deps --no-build-isolation -e \.", makefile)
    # Every node: the same lock, the same torch release, the project without resolving anything else.
    commands = cluster["setup_commands"]
    node_lock = [c for c in commands if "requirements.lock" in c]
    assert len(node_lock) == 1 and "--require-hashes" in node_lock[0] and "--no-deps" in node_lock[0]
    assert any("torch-constraint.txt torch" in c for c in commands)
    # Nothing else is installed by name with a floating version, on any node.
    everything = commands + cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    for command in install_commands("\n".join(everything)):
        if "pip install" in command and "requirements.lock" not in command and " -e " not in command:
            named = re.findall(r"(?<=\s)([A-Za-z][A-Za-z0-9_.\-]*(?:\[[^\]]*\])?)(?=\s|$)", command.split("install", 1)[1])
            loose = [n for n in named if n not in {"torch"} and not n.startswith("-") and "==" not in n]
            assert not loose, f"{command!r} installs {loose} without a pin"
    assert any("deepspeed" in c for c in cluster["worker_setup_commands"])  # GPU workers only
    assert not any("deepspeed" in c for c in cluster["setup_commands"] + cluster["head_setup_commands"])
    # The checkout goes to every node and is installed from there.
    project = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert any(f"-e {project.replace('/home/ubuntu', '~')}" in c for c in commands)
    # The store is one path on every node: exported by the head, mounted by the workers.
    store = "/home/ubuntu/eac-store"
    assert any(store in c and "/etc/exports" in c for c in cluster["head_setup_commands"])
    assert any(f"$RAY_HEAD_IP:{store} {store}" in c for c in cluster["worker_setup_commands"])


def test_the_deepspeed_lock_agrees_with_the_main_lock(cluster):
    """GPU workers add lock/deepspeed.lock on top of requirements.lock: it must not move a shared pin."""
    main = locked_pins()
    extra = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", (ROOT / "lock" / "deepspeed.lock").read_text(), flags=re.M))
    assert "deepspeed" in extra
    moved = {name: (pinned, main[name.lower()]) for name, pinned in extra.items()
             if name.lower() in main and main[name.lower()] != pinned}
    assert not moved, f"lock/deepspeed.lock moves pins of requirements.lock: {moved}"
    assert any("lock/deepspeed.lock" in c and "--require-hashes" in c for c in cluster["worker_setup_commands"])
    # make setup (and so CI) installs it too, hash-checked, and the suite runs on those pins.
    makefile_line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "-r lock/deepspeed.lock" in line)
    assert "--require-hashes" in makefile_line and "--no-deps" in makefile_line and "DS_BUILD_OPS=0" in makefile_line
    for name, pinned in extra.items():
        if name.lower() not in {"setuptools", "pip"}:
            assert version(name) == pinned, f"{name}: installed {version(name)}, locked {pinned} (lock/deepspeed.lock)"
