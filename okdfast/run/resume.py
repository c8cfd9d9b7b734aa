"""What a start means: a new run, or the continuation of the run that is in the folder, with which config.

A resumed run continues the run that is there, with *its* config (the checkpoint's, which config.yaml repeats):

- ``python -m okdfast.train --out RUN --resume auto`` needs no other flag; it trains the run's recipe.
- A flag (or YAML key) that contradicts the run's recipe is refused before anything is built, with the list of
  differences (``--lr 0.05 (the run: 0.1)``). Extending a run with a larger ``--epochs`` is refused too: its lr
  milestones and KD ramp-up follow from the epoch count.
- Settings of :data:`okdfast.config.recipe.TUNABLE_FIELDS` (workers, loader, device, data path, compile, ...) may
  change; the change is logged and recorded in sessions.jsonl, config.yaml keeps the values the run started with.
- :data:`okdfast.config.recipe.SESSION_FIELDS` (``--max-steps``, ``--progress``, ...) always come from this command.

``--resume auto`` in a folder that holds a config.yaml but no checkpoint yet (a run killed in its first epoch)
starts that run again from scratch, with its config. ``--resume PATH`` continues from another checkpoint: its config
is the run's (and must agree with the folder's config.yaml, when the folder holds one). Without ``--resume``, a
folder that holds a run is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from okdfast.config import TrainConfig
from okdfast.config.recipe import SESSION_FIELDS, TUNABLE_FIELDS, differences, is_unset, same_value
from okdfast.errors import CheckpointError, ConfigError, RunFolderError
from okdfast.run.checkpoint_contents import check_state
from okdfast.run.checkpoint_file import load_checkpoint
from okdfast.run.folder import CONFIG, RunFolder, default_run_dir


@dataclass
class Start:
    config: TrainConfig  # what this process trains with
    folder: RunFolder
    checkpoint: Path | None = None  # the checkpoint continued (None: from scratch)
    payload: dict[str, Any] | None = None  # its contents, loaded once
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # tunable settings changed: (run's, now)
    new_run: bool = True  # nothing of this run exists yet: config.yaml and environment.json are written

    @property
    def resumed(self) -> bool:
        return self.payload is not None


def explicit_fields(config: TrainConfig) -> set[str]:
    """For a caller of ``run(config)``: every field it set (all, except those left None that mean 'default')."""
    return {f.name for f in dataclasses.fields(config) if not is_unset(f.name, getattr(config, f.name))}


def branches_of(config: TrainConfig) -> int:
    from okdfast.methods import method_class

    return config.branches if config.branches is not None else method_class(config.method).default_branches


def recipe_fields() -> list[str]:
    """The fields that make a run what it is (every field but the session's and the tunable settings)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SESSION_FIELDS | TUNABLE_FIELDS]


def check_checkpoint_of_folder(
    base: TrainConfig, folder_config: dict[str, Any], checkpoint: Path, run_dir: Path
) -> None:
    """--resume PATH into a folder that holds a run: the checkpoint must be of that run."""
    theirs = TrainConfig.from_dict(folder_config, str(run_dir / CONFIG)).to_dict()
    ours = {k: v for k, v in base.to_dict().items() if not is_unset(k, v)}
    clash = differences(theirs, ours, recipe_fields())
    if clash:
        raise CheckpointError(
            f"--resume {checkpoint}: this checkpoint is of another run than the one in {run_dir} (the checkpoint "
            f"vs {CONFIG}: {'; '.join(clash)}); resume it with --out of its own folder, or pass another --out"
        )


def refuse_other_recipe(base: TrainConfig, given: dict[str, Any], source: str) -> None:
    """A resumed run keeps its own recipe: a value this command gives that contradicts it is refused."""
    refused = differences(base.to_dict(), given, recipe_fields())
    if refused:
        extend = (
            " Extending a run to more epochs is not supported: its lr milestones and KD ramp-up follow from "
            "--epochs; start a new run for a longer schedule."
            if any(item.startswith("--epochs ") for item in refused)
            else ""
        )
        raise ConfigError(
            f"{source}: the run it continues has another config than this command's: {'; '.join(refused)}. A "
            f"resumed run keeps its own config: drop these flags to continue it, or pass --out NEW (without --resume) "
            f"to start a new run with them.{extend}"
        )


def plan_start(config: TrainConfig, explicit: set[str] | None = None, *, writer: bool = True) -> Start:
    """Decide what this start is (see the module docstring); raises a UserError for every refusal. Reads the run
    folder and the checkpoint; writes nothing."""
    explicit = explicit_fields(config) if explicit is None else set(explicit)
    run_dir = Path(config.out) if config.out else default_run_dir(
        config.method, config.arch, config.dataset, branches_of(config), config.seed
    )  # fmt: skip
    folder = RunFolder(run_dir, writer=writer)
    folder.planned_state = folder.state()  # checked again when the folder is locked (okdfast.run.folder)
    folder.check_usable()
    if writer:
        folder.check_not_in_use()
    folder_config = folder.stored_config()

    if config.resume is None:
        if folder.holds_run():
            held = "last.pt" if folder.last.is_file() else CONFIG
            raise RunFolderError(
                f"run folder {run_dir} already holds a run (its {held}): pass --resume auto to continue it, "
                "or --out NEW_FOLDER to start a new run"
            )
        return Start(config, folder)
    checkpoint = (folder.last if folder.last.is_file() else None) if config.resume == "auto" else Path(config.resume)
    payload = load_checkpoint(checkpoint, where="--resume") if checkpoint is not None else None

    stored = payload["config"] if payload is not None else folder_config
    if stored is None:  # --resume auto in a folder without a run: a new run
        return Start(config, folder)
    where = f"--resume {checkpoint}" if payload is not None else f"{run_dir / CONFIG}"
    base = TrainConfig.from_dict(stored, where)
    if payload is not None:
        check_state(payload, base.epochs, where)
    if payload is not None and folder_config is not None:
        check_checkpoint_of_folder(base, folder_config, checkpoint, run_dir)
    given = {
        name: getattr(config, name)
        for name in explicit
        if name not in SESSION_FIELDS and not is_unset(name, getattr(config, name))
    }
    source = f"--resume {checkpoint}" if payload is not None else f"--resume {config.resume}: {run_dir / CONFIG}"
    refuse_other_recipe(base, given, source)
    changes = {
        name: (getattr(base, name), given[name])
        for name in sorted(TUNABLE_FIELDS & set(given))
        if not same_value(getattr(base, name), given[name])
    }
    session = {name: getattr(config, name) for name in SESSION_FIELDS if hasattr(config, name)}
    session["out"] = str(run_dir) if config.out else None
    final = dataclasses.replace(base, **{name: new for name, (_, new) in changes.items()}, **session)
    final.validate()
    return Start(final, folder, checkpoint, payload, changes, new_run=folder_config is None)
