"""Run configs: a saved run's config.json read back, a config copied with keys set, and the
differences that forbid a resume.

Configs are ml_collections ConfigDicts declared by qat_jax/configs/base.py and locked. A run
saves its config as config.json; resuming compares the two, ignoring the groups that do not
change a run's maths (RESUMABLE_CHANGES) and keys a later version added at their defaults.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

from qat_jax import files
from qat_jax.errors import UsageError, UserError

# Config groups that may change when a run resumes (they do not change its maths).
RESUMABLE_CHANGES = ("checkpoint", "logging", "mesh", "compile")
# Keys renamed since a run's config.json may have been written: old key -> (new key, value).
RENAMED_KEYS = {"model.remat": ("model.remat_policy", lambda v: "full" if v else "none")}


def load_run_config(workdir: str | Path):
    """The locked config a run in `workdir` was started with (its config.json over base.py's
    keys, so types are base.py's and a stale key is an error)."""
    path = files.path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} is not a qat-jax run directory (no config.json)")
    saved = files.read_json(path, "it holds the config the run was started with: restore it, "
                                  "or write it again from that config (qat-jax train writes it "
                                  "as config.to_json())")
    return config_from_saved(saved, str(path))


def config_from_saved(saved: dict, origin: str):
    """The locked config of a saved config dict (a run's config.json, an export's metadata)
    over base.py's keys; `origin` names it in the error for a key base.py lacks."""
    from flax import traverse_util  # here: the CLI imports this module, and flax takes 0.5 s

    from qat_jax.configs import base

    config = base.get_config()
    known = traverse_util.flatten_dict(config.to_dict(), sep=".")
    flat = traverse_util.flatten_dict(upgrade_saved(saved), sep=".")
    for key in flat:
        if key not in known:
            raise UserError(f"{origin}: unknown key {key} (written by another version?)")
    config.update_from_flattened_dict(flat)
    config.lock()
    return config


def upgrade_saved(saved: dict) -> dict:
    """A config.json written by an older version in today's keys: renamed keys (RENAMED_KEYS)
    moved, qat.fraction's old string ('auto', 'law' or a number) split into
    qat.fraction_policy and the number, and model.matmul_precision 'float32' where it is
    absent (its default before 'auto'); other keys added since then are absent and so take
    base.py's defaults where it is read (each new key's default keeps the old behaviour)."""
    saved = json.loads(json.dumps(saved))
    for old, (new, convert) in RENAMED_KEYS.items():
        (og, ok), (ng, nk) = old.split("."), new.split(".")
        if ok in saved.get(og, {}):
            saved.setdefault(ng, {})[nk] = convert(saved[og].pop(ok))
    qat = saved.get("qat", {})
    if isinstance(qat.get("fraction"), str):  # one key once held the policy or the number
        policy = qat["fraction"] if qat["fraction"] in ("auto", "law") else "fixed"
        qat["fraction_policy"] = policy
        qat["fraction"] = float(qat["fraction"]) if policy == "fixed" else None
    if isinstance(saved.get("model"), dict):
        saved["model"].setdefault("matmul_precision", "float32")
    return saved


def config_with(config, **keys):
    """A locked copy of `config` with dotted keys set: config_with(c, **{"quant.bits": 4.0})."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.update_from_flattened_dict(keys)
    c.lock()
    return c


def config_diffs(old: dict, config) -> list[str]:
    """'group.key: old -> new' for every setting of `config` that differs from `old` (a saved
    config.json), leaving out the groups a resumed run may change (RESUMABLE_CHANGES). A key
    the old config lacks (added by a later version) differs only when it is not base.py's
    default."""
    from qat_jax.configs import base

    defaults = json.loads(base.get_config().to_json_best_effort())
    old = upgrade_saved(old)
    old = {g: ({**defaults[g], **v} if isinstance(v, dict) and isinstance(defaults.get(g), dict)
               else v) for g, v in {**defaults, **old}.items()}
    new = json.loads(config.to_json_best_effort())
    diffs = [f"{g}.{k}: {old.get(g, {}).get(k)!r} -> {v!r}" for g, group in new.items()
             if isinstance(group, dict) and g not in RESUMABLE_CHANGES
             for k, v in group.items() if old.get(g, {}).get(k) != v]
    return diffs + [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                    if not isinstance(v, dict) and old.get(k) != v]


def load_config_file(arg: str):
    """The config of `--config=FILE[:ARG]` (resolved), loaded here first so that a file that
    does not import, has no get_config or raises in it is named as the problem."""
    path, _, extra = arg.partition(":")
    spec = importlib.util.spec_from_file_location("qat_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UsageError(f"--config={arg}: syntax error at line {e.lineno}: {e.msg}") from None
    except ModuleNotFoundError as e:
        moved = (e.name or "").split(".")[0] == "configs"  # the shipped configs' old home
        hint = ("; the shipped configs live in the package now: `from qat_jax.configs import "
                "base`" if moved else "")
        raise UsageError(f"--config={arg}: importing it raised ModuleNotFoundError: {e}"
                         f"{hint}") from None
    except Exception as e:
        raise UsageError(f"--config={arg}: importing it raised {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config={arg}: the file defines no get_config() (a config file "
                         f"returns an ml_collections.ConfigDict from get_config(); see "
                         f"qat_jax/configs/tiny.py)")
    try:
        config = module.get_config(*([extra] if extra else []))
    except (Exception, SystemExit) as e:
        raise UsageError(f"--config={arg}: get_config raised {type(e).__name__}: {e}") from None
    check_keys(config, f"--config={arg}")
    return config


def check_keys(config, origin: str):
    """A config from a file has exactly qat_jax/configs/base.py's keys (as `--config.KEY=` overrides
    are checked): an added key (a typo such as model.dmodel) or a missing one is an error that
    names it and the nearest declared keys, before anything runs."""
    import ml_collections
    from flax import traverse_util

    from qat_jax.configs import base

    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"{origin}: get_config() returned {type(config).__name__}, not an "
                         f"ml_collections.ConfigDict; start from qat_jax/configs/base.py's "
                         f"get_config() and set its fields (see qat_jax/configs/tiny.py)")
    known = traverse_util.flatten_dict(base.get_config().to_dict(), sep=".")
    have = traverse_util.flatten_dict(config.to_dict(), sep=".")
    for key in sorted(set(have) - set(known)):
        group, _, name = key.rpartition(".")
        options = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group)
        near = difflib.get_close_matches(name, options, n=3) if options else \
            difflib.get_close_matches(key, sorted(known), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "."
        raise UsageError(f"{origin}: get_config() adds key {key}, which qat_jax/configs/base.py "
                         f"does not declare{hint} A config file sets base.py's keys only")
    missing = sorted(set(known) - set(have))
    if missing:
        raise UsageError(f"{origin}: get_config() lacks {len(missing)} of "
                         f"qat_jax/configs/base.py's keys ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''})"
                         f"; start from base.get_config() and set fields on it")


def check_overrides(config, argv: list[str]):
    """Every `--config.KEY=VALUE` names a key of the config, or the error names that flag and
    the nearest keys."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key, _, value = arg[len("--config."):].partition("=")
        if key == "qat.fraction" and value in ("auto", "law"):
            raise UsageError(f"{arg}: qat.fraction is the number of qat.fraction_policy='fixed'; "
                             f"the policy is its own key: --config.qat.fraction_policy={value}")
        node, done = config, []
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                options = sorted(node.keys()) if hasattr(node, "keys") else []
                near = difflib.get_close_matches(part, options, n=3)
                where = ".".join(done) or "the config"
                hint = f"did you mean {', '.join(near)}? " if near else ""
                raise UsageError(f"{arg.split('=')[0]}: {where} has no key {part!r}; {hint}"
                                 f"keys there: {', '.join(options)}. Every key is declared in "
                                 f"qat_jax/configs/base.py")
            node, done = node[part], [*done, part]
