"""The deepspeed and transformers versions dpo-ds is tested with, checked at start-up.

dpo-ds uses internals of both (ZeRO-3's module stack and zero.Init hooks, transformers' checkpoint conversion
mapping) that change between minor releases, so a version outside the tested range stops every command before
any work with a message saying how to fix it. The ranges are declared once, in setup.cfg's install_requires
(the Makefile reads its deepspeed range from there too); an installed package carries them in its metadata.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

PINNED = ("deepspeed", "transformers")
ALLOW_ENV = "DPO_DS_ALLOW_UNTESTED_VERSIONS"
SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def tested_ranges(setup_cfg: Path = SETUP_CFG, packages: tuple[str, ...] = PINNED) -> dict[str, Requirement]:
    """package -> its requirement in setup.cfg (a source checkout, editable installs included), else in the
    installed dpo-ds metadata (a wheel install has no setup.cfg), for each of `packages` declared there."""
    parser = configparser.ConfigParser()
    if setup_cfg.is_file() and parser.read(setup_cfg) and parser.has_option("options", "install_requires"):
        lines = parser["options"]["install_requires"].splitlines()
    else:
        lines = importlib.metadata.requires("dpo-ds") or []
    requirements = [Requirement(line) for line in lines if line.strip()]
    return {r.name: r for r in requirements if r.name in packages and not r.marker}


def pip_spec(requirement: Requirement) -> str:
    """`deepspeed>=0.19.8,<0.20`: lower bound first, as setup.cfg writes it (packaging's str() sorts the other way)."""
    return requirement.name + ",".join(sorted((str(s) for s in requirement.specifier), reverse=True))


def installed_version(package: str) -> str | None:
    """The installed distribution's version, read from its metadata (the package is not imported)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problems(ranges: dict[str, Requirement] | None = None) -> list[tuple[str, bool]]:
    """(message, missing) per pinned package that is not installed (missing) or outside its tested range."""
    problems = []
    for name, requirement in (tested_ranges() if ranges is None else ranges).items():
        version = installed_version(name)
        spec = pip_spec(requirement)
        fix = f'run `make install`, or pip install --no-build-isolation "{spec}"'
        if version is None:
            problems.append((f"{name} is not installed; dpo-ds needs {spec}: {fix}", True))
            continue
        try:
            inside = requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            problems.append((f"{name} {version} is installed, but dpo-ds is tested with {spec}: {fix} "
                             f"(or set {ALLOW_ENV}=1 to run with it anyway)", False))
    return problems


def check_versions(program: str) -> bool:
    """Print each problem as `program: error: ...` on stderr; False unless every pinned package is inside its
    tested range. With DPO_DS_ALLOW_UNTESTED_VERSIONS=1 a version outside its range is only a warning."""
    allowed = os.environ.get(ALLOW_ENV) == "1"
    ok = True
    for message, missing in version_problems():
        fatal = missing or not allowed
        ok = ok and not fatal
        print(f"{program}: {'error' if fatal else 'warning'}: {message}", file=sys.stderr, flush=True)
    return ok
