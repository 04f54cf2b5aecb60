"""The provider seam: providers are named only in the registry and their own packages; the
CLI, the config core and the remote layer ask capabilities; adding a provider is one package
and one registry line."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lenslab import config
from lenslab.cli import main
from lenslab.errors import ConfigError
from lenslab.providers import registry
from lenslab.providers.base import Capabilities, Provider

SRC = Path(__file__).resolve().parents[2] / "src" / "lenslab"
# Where no provider may be named: they ask the provider, never test its name.
NEUTRAL = sorted([*(SRC / "cli").glob("*.py"), SRC / "config.py", *(SRC / "remote").glob("*.py")])
# Provider names that are also ordinary words there ("lenslab ssh", shutil.which("ssh")): for
# these, only a use as a provider counts (compared, a dict key, a Literal choice).
COMMON_WORDS = {"ssh", "local"}
NEUTRAL_MODULES = {"lenslab.providers", "lenslab.providers.base", "lenslab.providers.registry",
                   "lenslab.providers.offers"}  # fmt: skip


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def provider_names_in(source: str, names: list[str]) -> list[str]:
    """Every place ``source`` names a provider: "line: what" (empty: none)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    distinct = [n for n in names if n not in COMMON_WORDS]
    word = re.compile(rf"(?<![A-Za-z0-9]){'|'.join(map(re.escape, distinct))}(?![A-Za-z0-9])", re.I)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if distinct and word.search(node.value):
                found.append(f"{line}: string {node.value!r}")
        elif isinstance(node, ast.Compare):
            found += [f"{line}: compared with {s!r}" for s in _strings(node) if s in names]
        elif isinstance(node, ast.Dict):
            found += [f"{line}: dict key {s!r}" for k in node.keys if k is not None for s in _strings(k) if s in names]
        elif isinstance(node, ast.Subscript) and "Literal" in ast.unparse(node.value):
            found += [f"{line}: Literal choice {s!r}" for s in _strings(node.slice) if s in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lenslab.providers."):
            if node.module not in NEUTRAL_MODULES:
                found.append(f"{line}: imports {node.module}")
        elif _asks_a_provider_by_attribute(node):
            assert isinstance(node, ast.Call)
            found.append(f"{line}: {ast.unparse(node.func)} on a provider (ask provider.capabilities)")
    return found


def _asks_a_provider_by_attribute(node: ast.AST) -> bool:
    """``getattr(provider, ...)``: an ability found by probing, not declared."""
    if not isinstance(node, ast.Call) or ast.unparse(node.func) not in ("getattr", "hasattr") or not node.args:
        return False
    return "provider" in ast.unparse(node.args[0])


def test_the_checker_finds_each_way_a_provider_used_to_be_named() -> None:
    bad = textwrap.dedent(
        """
        from typing import Literal
        from lenslab.providers.lambda_cloud.provider import client_from_environment
        ROOTS = {"ssh": "~/lenslab", "local": "~/.local/share/lenslab"}
        kind: Literal["local", "ssh", "lambda"]
        if box.provider == "lambda": pass
        terminates = box.provider not in ("local", "ssh")
        note = "the file system stays, billed by Lambda per GB-month"
        cost = getattr(provider, "cost", None)
        """
    )
    found = provider_names_in(bad, registry.names())
    # Every line names a provider one way: import, dict keys, Literal, ==, not in, text, getattr.
    assert {int(f.split(":")[0]) for f in found} == set(range(3, 10)), found
    fine = '"""A docstring may say lambda."""\nimport shutil\nx = shutil.which("ssh")\nf = lambda y: y\n'
    assert provider_names_in(fine, registry.names()) == []


@pytest.mark.parametrize("path", NEUTRAL, ids=lambda p: str(p.relative_to(SRC)))
def test_no_provider_is_named_in_the_cli_the_config_or_remote(path: Path) -> None:
    assert provider_names_in(path.read_text(), registry.names()) == []


def test_every_registered_provider_declares_its_capabilities_one_way() -> None:
    for name in registry.names():
        cls = registry.provider_class(name)
        assert issubclass(cls, Provider) and cls.name == name
        assert isinstance(cls.capabilities, Capabilities)
        assert cls.default_root and cls.summary
        if cls.capabilities.needs_api_key:
            assert cls.capabilities.api_key_env == f"{name.upper()}_API_KEY"
            assert cls.capabilities.api_key_file == f"{name}-api-key"
    caps = {name: registry.provider_class(name).capabilities for name in registry.names()}
    assert caps["runpod"].interruptible and caps["vast"].interruptible and not caps["lambda"].interruptible
    assert caps["runpod"].container_box and caps["runpod"].launches and caps["vast"].cost
    assert caps["lambda"].persistent_volumes and not caps["vast"].persistent_volumes
    with pytest.raises(AttributeError):
        caps["ssh"].rents_machines = True  # type: ignore[misc]  # frozen: declared, not changed


def test_help_imports_no_provider() -> None:
    code = (
        "import sys\nfrom lenslab.cli import build_parser\nbuild_parser()\n"
        "print([m for m in sys.modules if m.startswith(('lenslab.providers.', 'httpx', 'paramiko'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lenslab.providers.registry']"


DUMMY = """
from __future__ import annotations

from typing import ClassVar

from lenslab.providers.base import Capabilities, OfferQuery, Provider
from lenslab.providers.offers import Offer


class DummyProvider(Provider):
    name = "dummy"
    capabilities: ClassVar[Capabilities] = Capabilities(
        rents_machines=True, offers=True, interruptible=True, api_key_env="DUMMY_API_KEY", api_key_file="dummy-api-key"
    )
    default_root: ClassVar[str] = "/data/lenslab"
    summary: ClassVar[str] = "a test cloud"

    @classmethod
    def config_problem(cls, cfg):
        return None if cfg.regions else "provider 'dummy' needs box.regions"

    def offers(self, query: OfferQuery) -> list[Offer]:
        offer = Offer("dummy", "d1", "A100 DUMMY", 1, 80.0, "zz-1", 0.05, 0.01, True, True)
        return [o for o in [offer] if query.accepts(o)]
"""


@pytest.fixture
def dummy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A provider package written now, made known with one registry line."""
    package = tmp_path / "dummycloud"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "provider.py").write_text(DUMMY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("LAMBDA_API_KEY", "RUNPOD_API_KEY", "VAST_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DUMMY_API_KEY", "dummy-key-never-printed")
    registry.register("dummy", "dummycloud.provider:DummyProvider")  # the one line
    yield "dummy"
    registry.unregister("dummy")
    for module in ("dummycloud.provider", "dummycloud"):
        sys.modules.pop(module, None)


def test_adding_a_provider_is_one_registry_line(dummy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lenslab.toml"
    # Config validation asks the registry and the provider itself.
    path.write_text('[box]\nname = "d"\nprovider = "dummy"\nregions = ["zz-1"]\n')
    box = config.load(path).box
    assert (box.provider, box.persistent_root) == ("dummy", "/data/lenslab")
    path.write_text('[box]\nname = "d"\nprovider = "dummy"\n')
    with pytest.raises(ConfigError, match=r"box: provider 'dummy' needs box.regions$"):
        config.load(path)
    # `lenslab offers` asks it with the others (which have no key here), and lists its offer.
    assert main(["offers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(o["provider"], o["gpu_name"]) for o in data["offers"]] == [("dummy", "A100 DUMMY")]
    assert {p["provider"]: p["status"] for p in data["providers"]}["dummy"] == "ok"
    # `lenslab init` offers it as a choice.
    assert main(["--config", str(tmp_path / "new.toml"), "init", "--provider", "dummy", "--json"]) == 0
    assert "# dummy: a test cloud" in (tmp_path / "new.toml").read_text()
    assert "dummy-key-never-printed" not in capsys.readouterr().out


def test_an_unknown_provider_in_lenslab_toml_lists_the_registered_ones(tmp_path: Path) -> None:
    path = tmp_path / "lenslab.toml"
    path.write_text('[box]\nname = "d"\nprovider = "aws"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    choices = ", ".join(registry.names())
    assert str(caught.value).endswith(f"box.provider: 'aws' is not a provider: use one of {choices}")
