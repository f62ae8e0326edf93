"""The Dockerfile builds the predictor image the manifests run.

No container engine runs on these machines, so the image is not built here. Instead: everything the Dockerfile
copies is in the build context (present and not dropped by .dockerignore), what it copies is what `pip install .`
needs, the install step is the project's own install, and the entrypoint starts the server from the installed
package as the manifests expect.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "inferenceservices" / "base" / "servingruntime.yaml"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def args_of(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    out = []
    for instruction, args in instructions():
        words = shlex.split(args)
        if instruction in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            words = [w for w in words if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def ignored(path: str) -> bool:
    """Whether .dockerignore drops ``path`` (relative, POSIX) from the build context: Docker's rules, the last
    matching pattern wins and a pattern matching a parent directory matches everything under it."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _docker_pattern(pattern.lstrip("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def context_files(source: str) -> list[str]:
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return [p.relative_to(ROOT).as_posix() for p in files]


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    assert copies(), "the Dockerfile copies the project in"
    for sources, _ in copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            kept = [f for f in context_files(source) if not ignored(f)]
            assert kept, f"COPY {source}: .dockerignore drops it from the build context"


def test_dockerignore_keeps_the_package_and_drops_the_rest() -> None:
    assert not ignored("predictor/__main__.py") and not ignored("pyproject.toml")
    for path in ("tests/test_dockerfile.py", ".git/HEAD", "predictor/__pycache__/config.cpython-311.pyc",
                 "notebooks/demo.ipynb", "falcon_predictor.egg-info/PKG-INFO", "models/model.safetensors"):
        assert ignored(path), path


def test_what_is_copied_is_exactly_what_pip_install_needs() -> None:
    copied = {source.rstrip("/") for sources, _ in copies() for source in sources}
    project = pyproject()
    needed = {"pyproject.toml"}
    readme = project["project"].get("readme")
    if readme:
        needed.add(readme if isinstance(readme, str) else readme["file"])
    needed |= set(project["project"].get("license-files", []))
    finder = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    needed |= {pattern.rstrip(".*") for pattern in finder.get("include", ["predictor"])}
    assert copied == needed, f"pip install . reads {sorted(needed)}; the Dockerfile copies {sorted(copied)}"
    assert all(not dest.startswith("/") for _, dest in copies()), "into the WORKDIR where pip install runs"


def test_the_install_step_is_the_projects_own_install() -> None:
    installs = [args for args in args_of("RUN") if "pip install" in args]
    assert len(installs) == 1, "one pip install: the project's own"
    command = installs[0].split("&&")[0].split()
    assert command[:2] == ["pip", "install"] and command[2:] == ["'.[gpu]'"], (
        f"{installs[0]!r}: the install is `pip install '.[gpu]'` (torchao for the GPU schemes), dependencies from "
        "pyproject.toml only")
    assert "test" not in installs[0], "the test extra stays out of the image"


def test_no_weights_are_baked_in() -> None:
    for args in args_of("RUN"):
        assert not re.search(r"download|snapshot|hf_hub|from_pretrained|wget|curl", args), args
    for sources, _ in copies():
        for source in sources:
            assert not re.search(r"\.(safetensors|bin|pt|gguf)$|models?/", source), source


def test_the_entrypoint_starts_the_server_from_the_installed_package() -> None:
    (entrypoint,) = args_of("ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "predictor"], "exec form, so SIGTERM reaches the server"
    assert not args_of("CMD"), "arguments come from the InferenceService"
    assert (ROOT / "predictor" / "__main__.py").is_file()
    # At run time the sources are gone and the working directory is elsewhere: only the installed package runs.
    workdir, install_dir = "/", None
    for instruction, args in instructions():
        workdir = args if instruction == "WORKDIR" else workdir
        if instruction == "RUN" and "pip install" in args:
            install_dir = workdir
            assert f"rm -rf {workdir}" in args, "the sources are removed after the install"
    assert install_dir and workdir != install_dir


def test_the_installed_package_answers_the_entrypoint_command(tmp_path: Path) -> None:
    """What the image runs, from outside the source tree: works only where the project is installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "predictor", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_name" in result.stdout and "--drain_timeout" in result.stdout


def test_the_image_user_is_the_one_the_manifests_run_as() -> None:
    (user,) = args_of("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user, so runAsNonRoot can be verified"
    container = yaml.safe_load(RUNTIME.read_text())["spec"]["containers"][0]
    assert container["securityContext"]["runAsUser"] == int(uid)
    assert container["securityContext"].get("runAsGroup", int(gid or uid)) == int(gid or uid)
    port = next(a.split("=")[1] for a in container["args"] if a.startswith("--http_port="))
    assert args_of("EXPOSE") == [port]


def test_the_base_image_is_a_slim_python_the_project_supports() -> None:
    (base,) = args_of("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", base)
    assert match, f"{base}: a slim Python image"
    assert pyproject()["project"]["requires-python"] == f">={match[1]}"


@pytest.mark.parametrize("path, expected", [
    ("predictor/engine.py", False), ("predictor", False), ("README.md", False), ("tests", True),
    ("predictor/sub/__pycache__/x.pyc", True), ("inferenceservices/base/falcon-7b.yaml", True)])
def test_the_dockerignore_matcher(path: str, expected: bool) -> None:
    assert ignored(path) is expected
