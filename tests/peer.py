"""The paper's official code (the "peer" release) for tests and benchmarks that compare against it.

The release (lucasdegeorge/T2I-ImageNet, MIT; see `../shared/peer/README.md`) is never copied into the
project: it is imported at run time from its folder, and everything here raises `PeerUnavailable` (with the
reason) when it cannot be, so callers skip cleanly:

    from tests.peer import PeerUnavailable, build_official_network, official_network_class

    try:
        net = build_official_network("L")  # RINTextCond, configured as the paper's ImageNet-256 L model
    except PeerUnavailable as exc:
        pytest.skip(str(exc))

Where it is looked for: `$T2I_PEER_ROOT` if set, else `<repo>/../shared/peer/T2I-ImageNet`.

How it is imported: the training code lives in `t2i_imagenet/training/cad` and imports itself absolutely
(`from models.networks.transformers import ...`), so that folder goes first on `sys.path`, as the peer's own
scripts expect. Its package `__init__` files are empty today; should one of them ever pull heavy unrelated
dependencies (hydra, lightning, wandb), the wanted file is loaded directly from its path under bare parent
packages (nothing of the network itself is stubbed). The peer's top-level packages are called `models`,
`data`, `utils`..., names our checkout also has at its root: unrelated modules of those names already
imported are set aside during the import and put back afterwards, and the peer modules are kept in a cache
here (`import_peer_module` returns the same module objects on every call, so classes compare equal across
calls).

Configurations: `peer_config("imagenet_256_rin_L_text_ldm")` composes the peer's Hydra config tree
(`configs/config.yaml` + `overrides=<name>`) with a small reader of the Hydra defaults-list rules that tree
uses (groups, `override /group: choice`, `# @package _global_`, `_self_`, `${a.b}` interpolation) — hydra
and omegaconf are not dependencies of ours. `official_network_config("L" | "base")` is its resolved
`model.network` node: the values come from `configs/model/network/rin_text.yaml`, overridden by
`configs/model/use_ldm/precomputed_resample.yaml` (4 input channels),
`configs/data/dataset/imagenet_256_ldm_text.yaml` (latent 32, flan-t5-xl width 2048),
`configs/use_condition/classifier_free_guidance.yaml` and `configs/overrides/imagenet_256_rin_{L,base}_
text_ldm.yaml` (widths, depths, heads). Checked once against hydra-core 1.3.8's own `compose` on the four
ImageNet-256 overrides (L, base, each with and without `_cutmix`): the same tree, less Hydra's `hydra` node.

Note for weight conversion (`t2i.models.cad_official`): the training configs build `RINTextCond`, but the
released Hub checkpoint is loaded by `pipe.py` into `CAD(CADRINTextCond)`, the coherence-aware variant (an
extra coherence embedder and token: 331.55M parameters at the L configuration against RINTextCond's
330.24M); pass its `_target_` (`models.networks.rin.CADRINTextCond`) to `official_network_class` (or as an
override to `build_official_network`) to build that one.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PEER_ROOT_ENV = "T2I_PEER_ROOT"
DEFAULT_PEER_ROOT = Path(__file__).resolve().parents[2] / "shared" / "peer" / "T2I-ImageNet"
CAD_SUBDIR = Path("t2i_imagenet") / "training" / "cad"

# Override files of the paper's ImageNet-256 text-conditioned latent models, by size.
OFFICIAL_OVERRIDES = {"L": "imagenet_256_rin_L_text_ldm", "base": "imagenet_256_rin_base_text_ldm"}


class PeerUnavailable(RuntimeError):
    """The official code cannot be used here; `str(exc)` says why (absent folder, missing dependency...)."""


def peer_root() -> Path:
    """The release's root folder (`$T2I_PEER_ROOT`, else `<repo>/../shared/peer/T2I-ImageNet`); may not exist."""
    return Path(os.environ.get(PEER_ROOT_ENV) or DEFAULT_PEER_ROOT)


def cad_dir() -> Path:
    """`t2i_imagenet/training/cad` of the release: the folder its modules and configs are relative to."""
    root = peer_root()
    if not root.is_dir():
        raise PeerUnavailable(f"official code not found at {root} (set ${PEER_ROOT_ENV} to its folder)")
    path = root / CAD_SUBDIR
    if not path.is_dir():
        raise PeerUnavailable(f"{root} has no {CAD_SUBDIR}: not the T2I-ImageNet release")
    return path


# --------------------------------------------------------------------------------------------- importing

_LOADED: dict[str, types.ModuleType] = {}  # every peer module imported so far, by its peer name


def _is_peer_module(module: types.ModuleType | None, base: Path) -> bool:
    if module is None:
        return False
    files = [getattr(module, "__file__", None), *list(getattr(module, "__path__", []) or [])]
    return any(f is not None and Path(f).resolve().is_relative_to(base.resolve()) for f in files)


def _peer_tops(base: Path) -> set[str]:
    """Top-level names the release imports itself by (`models`, `utils`, `data`, `pipe`, ...)."""
    return {
        p.stem
        for p in base.iterdir()
        if (p.is_dir() and p.name.isidentifier() and p.name != "__pycache__") or p.suffix == ".py"
    }


@contextmanager
def _peer_import_context(base: Path):
    """Peer folder first on sys.path; foreign modules under the peer's top-level names (our checkout has a
    `models` and a `data` folder too) set aside, and put back on exit."""
    tops = _peer_tops(base)

    def own(name: str) -> bool:
        return name.split(".")[0] in tops

    stashed = {n: m for n, m in sys.modules.items() if own(n) and not _is_peer_module(m, base)}
    for name in stashed:
        del sys.modules[name]
    sys.modules.update({n: m for n, m in _LOADED.items() if own(n)})
    sys.path.insert(0, str(base))
    try:
        yield own
    finally:
        sys.path.remove(str(base))
        _LOADED.update({n: m for n, m in sys.modules.items() if own(n) and _is_peer_module(m, base)})
        if stashed:  # the foreign modules get their names back; the peer's stay reachable through _LOADED
            for name in [n for n in sys.modules if own(n)]:
                del sys.modules[name]
            sys.modules.update(stashed)


def _load_file_directly(name: str, base: Path) -> types.ModuleType:
    """Load `name` from its file, its parent packages as bare packages (their `__init__` not executed)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg in sys.modules:
            continue
        folder = base.joinpath(*parts[:i])
        module = types.ModuleType(pkg)
        module.__path__ = [str(folder)]
        module.__file__ = str(folder / "__init__.py")
        module.__package__ = pkg
        sys.modules[pkg] = module
    path = base.joinpath(*parts[:-1], parts[-1] + ".py")
    if not path.is_file():
        raise PeerUnavailable(f"official module {name} not found at {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_peer_module(name: str) -> types.ModuleType:
    """Import one module of the release by its own name (e.g. `"models.networks.rin"`).

    Plain import first; if that fails (say in a package `__init__`), the file is loaded directly under bare
    parent packages. Raises `PeerUnavailable` when the folder is absent, when the module itself needs a
    package that is not installed (the message names it) or when one of its imports fails otherwise. Some
    peer modules (`pipe`) import diffusers, which needs our torchvision shim: `import t2i.models` first.
    """
    if name in _LOADED:
        return _LOADED[name]
    base = cad_dir()
    with _peer_import_context(base) as own:
        try:
            importlib.import_module(name)
        except Exception:
            # Drop half-imported entries, then try the file itself under bare parent packages.
            for n in [n for n in sys.modules if own(n) and n not in _LOADED]:
                del sys.modules[n]
            try:
                _load_file_directly(name, base)
            except ImportError as exc:
                raise PeerUnavailable(
                    f"official module {name} needs {exc.name or '?'!r}, which is not installed ({exc})"
                ) from exc
            except Exception as exc:  # a dependency that is installed but does not import here
                raise PeerUnavailable(
                    f"official module {name} does not import here: {type(exc).__name__}: {exc}"
                ) from exc
    if name not in _LOADED:
        raise PeerUnavailable(f"official module {name} did not import from {base}")
    return _LOADED[name]


def official_network_class(target: str | None = None) -> type:
    """The official network class: `target` as a dotted `module.Class` (peer names), by default the
    `_target_` of the L configuration (`models.networks.rin.RINTextCond`)."""
    target = target or official_network_config("L")["_target_"]
    module_name, _, class_name = target.rpartition(".")
    module = import_peer_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise PeerUnavailable(f"{module.__file__} defines no {class_name}") from exc


# ------------------------------------------------------------------------------------------ configuration

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${a.b.c}; resolvers (${now:...}) are left alone


def _yaml_loader():
    """PyYAML's SafeLoader, reading `1e-3` as a float as OmegaConf does (YAML 1.1 alone wants `1.0e-3`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


def _read_config(path: Path) -> tuple[bool, list, dict]:
    import yaml

    if not path.is_file():
        raise PeerUnavailable(f"official config {path} not found")
    text = path.read_text()
    is_global = any(line.strip() == "# @package _global_" for line in text.splitlines()[:5])
    body = yaml.load(text, Loader=_yaml_loader()) or {}
    defaults = body.pop("defaults", []) if isinstance(body, dict) else []
    return is_global, defaults, body


def _merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _at(root: dict, dotted: str) -> dict:
    node = root
    for key in filter(None, dotted.split(".")):
        node = node.setdefault(key, {})
    return node


def _entries(defaults: list, group: str):
    """Defaults-list entries as (kind, absolute group, choice): kind is "self", "override", "config" (a
    group choice) or "file" (a bare name: a config of the containing group's folder)."""
    for entry in defaults:
        if entry == "_self_":
            yield "self", group, None
            continue
        if isinstance(entry, str):  # a config file of the containing group's folder
            yield "file", group, entry
            continue
        ((key, choice),) = entry.items()
        kind = "config"
        if key.startswith("override "):
            kind, key = "override", key[len("override ") :].strip()
        absolute = key[1:] if key.startswith("/") else "/".join(filter(None, [group, key]))
        yield kind, absolute, None if choice is None else str(choice)


def peer_config(overrides: str) -> dict[str, Any]:
    """The peer's composed training config for `overrides=<name>` (a file of `configs/overrides/`), as a
    plain dict with `${a.b}` interpolations resolved (Hydra resolvers such as `${now:...}` left as text).

    Follows the Hydra 1.x defaults-list rules the tree uses: group choices (relative to the containing
    config's group, or absolute with a leading `/`), `override /group: choice` anywhere in the tree,
    `# @package _global_` (else a config lands at its group's path), `_self_` (implicitly last), `null`
    choices skipped.
    """
    configs = cad_dir() / "configs"

    def walk(choices: dict[str, str], on_config, group: str, path: Path, strict: bool = True) -> None:
        if not strict and not path.is_file():  # pass 1 may visit choices that are overridden later
            return
        is_global, defaults, body = _read_config(path)
        package = "" if is_global else group.replace("/", ".")
        entries = list(_entries(defaults, group))
        if not any(kind == "self" for kind, _, _ in entries):
            entries.append(("self", group, None))
        for kind, sub, choice in entries:
            if kind == "self":
                on_config(package, body)
            elif kind == "override":
                on_config(None, (sub, choice))
            elif kind == "file":
                walk(choices, on_config, sub, configs / sub / f"{choice}.yaml", strict)
            else:
                choice = choices.get(sub, choice)
                if choice is None:
                    continue
                if choice == "???":
                    raise PeerUnavailable(f"official config group {sub} has no choice")
                walk(choices, on_config, sub, configs / sub / f"{choice}.yaml", strict)

    # Pass 1: collect `override` choices until they are stable (an override may select a config that
    # holds further overrides). Pass 2: merge the configs in defaults-list order.
    choices = {"overrides": overrides}
    for _ in range(10):
        found = dict(choices)

        def collect(package, item, found=found):
            if package is None:
                found[item[0]] = item[1]

        walk(choices, collect, "", configs / "config.yaml", strict=False)
        if found == choices:
            break
        choices = found
    cfg: dict[str, Any] = {}

    def merge(package, item):
        if package is not None:
            _merge(_at(cfg, package), item)

    walk(choices, merge, "", configs / "config.yaml")
    cfg.pop("hydra", None)  # Hydra's own settings, which it keeps out of the job's config too
    return _resolve(cfg, cfg)


def _lookup(root: dict, dotted: str, seen: tuple[str, ...]) -> Any:
    node: Any = root
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    if dotted in seen:
        raise ValueError(f"circular interpolation ${{{dotted}}}")
    return _resolve(node, root, (*seen, dotted))


def _resolve(node: Any, root: dict, seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, dict):
        return {k: _resolve(v, root, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, seen) for v in node]
    if not isinstance(node, str) or "${" not in node:
        return node
    whole = _INTERPOLATION.fullmatch(node)
    try:
        if whole:  # keeps the type (an int stays an int)
            return _lookup(root, whole.group(1), seen)
        return _INTERPOLATION.sub(lambda m: str(_lookup(root, m.group(1), seen)), node)
    except KeyError:
        return node  # refers to something outside the composed tree (hydra:, runtime keys): leave as text


def official_network_config(size: str = "L", cutmix: bool = False) -> dict[str, Any]:
    """The resolved `model.network` node of the paper's ImageNet-256 text-to-image latent model of `size`
    ("L" or "base"; `cutmix` selects the `_cutmix` override, whose network is the same), with `_target_`
    (the peer's dotted class path) and the constructor's keyword arguments."""
    if size not in OFFICIAL_OVERRIDES:
        raise KeyError(f"unknown official size {size!r}; choose from {sorted(OFFICIAL_OVERRIDES)}")
    name = OFFICIAL_OVERRIDES[size] + ("_cutmix" if cutmix else "")
    network = peer_config(name).get("model", {}).get("network")
    if not network or "_target_" not in network:
        raise PeerUnavailable(f"official config {name} composes no model.network")
    return network


def build_official_network(size: str = "L", **overrides: Any):
    """The official network of `size`, randomly initialised by its own constructor (float32, CPU), with any
    constructor argument overridden. Seed torch first for a reproducible initialisation."""
    kwargs = official_network_config(size)
    kwargs.update(overrides)
    cls = official_network_class(kwargs.pop("_target_"))
    return cls(**kwargs)


def official_batch(network, x, t, text, text_mask, latents_prev=None, coherence=None) -> dict[str, Any]:
    """Our call convention — x (B, C, H, W), t (B,) in [0, 1] with t = 0 clean, text (B, L, D), text_mask (B, L)
    True = real, latents from the previous step or None, coherence (B,) or None — as the dict the official
    network takes (`network(batch)` returns (output, latents)): its `gamma` is our 1 − t (the signal
    fraction, 1 = clean), None latents become zeros as the peer's `DDPMPrecond` makes them, None coherence
    is 1.0 (`CADRINTextCond` reads it, `RINTextCond` ignores it)."""
    import torch

    if latents_prev is None:
        latents_prev = torch.zeros(
            x.shape[0], network.num_latents, network.latents_dim, device=x.device, dtype=x.dtype
        )
    if coherence is None:
        coherence = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
    return {
        "y": x,
        "gamma": 1 - t,
        "previous_latents": latents_prev,
        "text_tokens_embeddings": text,
        "text_tokens_mask": text_mask.bool(),
        "coherence": coherence,
    }
