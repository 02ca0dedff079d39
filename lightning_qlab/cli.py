"""The ``lightning`` and ``lightning-qlab`` commands: Lightning's CLI with the package's models.

``lightning fit --config configs/mnist_mlp.yaml`` trains; ``validate``, ``test`` and ``predict``
work the same way. Any LightningModule and LightningDataModule can be chosen by class path, in
YAML (``model: {class_path: ..., init_args: {...}}``) or as flags (``--model ImageClassifier``);
the package's own are importable by their short names. Several ``--config`` files compose, later
ones overriding earlier ones (``--config configs/mnist_mlp.yaml --config configs/trainer/ddp.yaml``).

The ``lightning`` command name is shared with the Lightning AI platform CLI (package
``lightning-sdk``). ``fit``, ``validate``, ``test`` and ``predict`` are ours; any other subcommand
(``login``, ``run``, ...) is handed to ``lightning_sdk``'s CLI when it is installed.

Errors in the configuration (unknown class paths or keys, invalid values, YAML syntax, with the
file, line and column), missing or damaged data and unusable checkpoints end with one ``error:``
line and a non-zero exit status, not a stack trace, and before any run folder is created; with
the environment variable ``JSONARGPARSE_DEBUG=true`` they are raised with their full traceback
instead.

``fit`` resumes exactly: every training batch is seeded from its place in training
(:class:`~lightning_qlab.seeding.StepSeeding`) and reads the data in an order that is a function of
the seed and the epoch; ``--ckpt_path last`` continues from the newest ``last.ckpt`` of the runs
under the same root; and SIGTERM (or SLURM's requeue signal) saves ``last.ckpt`` at the current
step and exits with status 143 (:class:`~lightning_qlab.preemption.Preemption`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

# Imported so that their classes resolve by short name (``--model ImageClassifier``).
import lightning_qlab.data as qlab_data
import lightning_qlab.models as qlab_models
from lightning_qlab.checkpoints import (
    CheckpointError,
    check_checkpoint,
    checkpoint_folders,
    find_last_checkpoint,
    read_checkpoint,
)
from lightning_qlab.data import DataMismatchError, DataNotFoundError
from lightning_qlab.predictions import PredictionWriter
from lightning_qlab.preemption import Preemption
from lightning_qlab.seeding import StepSeeding

__all__ = ["QLABLightningCLI", "main", "lightning_main", "leave_process_group", "OUR_SUBCOMMANDS"]

OUR_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Exit statuses: 2 for a configuration the parser or a class rejects (argparse's convention),
# 1 for data or a checkpoint that is missing, damaged or does not fit the configuration. A fit
# stopped by SIGTERM exits with 128 + 15 = 143 (see lightning_qlab.preemption).
EXIT_BAD_CONFIG = 2
EXIT_DATA = 1

# The configs shipped with a source checkout, next to the package.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of the description and epilog."""


class QLABArgumentParser(LightningArgumentParser):
    """Lightning's parser, reporting a rejected configuration as one ``error:`` line.

    jsonargparse explains a rejected value with the full usage and a tree of every type it
    tried; the line printed here keeps the key, the class path and the reason.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: ``--trainer.max_epoch`` must be an error, not ``max_epochs``.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    @override
    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or _debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        _fail(parser.prog.replace(" [options]", ""), summarise_parse_error(message), EXIT_BAD_CONFIG)


def summarise_parse_error(message: str) -> str:
    r"""One line from jsonargparse's multi-line error: where (key, class path) and why.

    Example:
        >>> summarise_parse_error(
        ...     'Parser key "data":\n  Does not validate against any of the Union subtypes\n'
        ...     "  Errors:\n    - Problem with given class_path 'my.Data':\n"
        ...     "        Option 'batchsize' is not accepted\n    - Expected a <class 'NoneType'>\n"
        ...     "  Given value type: <class 'dict'>")
        "data: Option 'batchsize' is not accepted (class_path my.Data)"
    """
    keys: list[str] = []
    class_path = None
    reasons: list[str] = []
    for line in message.splitlines():
        text = line.strip()
        if text.startswith("- "):
            text = text[2:]
        key = re.fullmatch(r'Parser key "([^"]+)":', text)
        problem = re.fullmatch(r"Problem with given class_path '([^']+)':", text)
        if key:
            keys.append(key.group(1))
        elif problem:
            class_path = problem.group(1)
        elif text and not text.startswith(_PARSE_ERROR_NOISE):
            reasons.append(text)
    if not reasons:
        return " ".join(message.split())
    where = ".".join(keys)
    summary = f"{where}: {reasons[0]}" if where else reasons[0]
    if class_path and class_path not in summary:
        summary += f" (class_path {class_path})"
    return summary


# Lines of a jsonargparse error that describe the parser's attempts, not the problem.
_PARSE_ERROR_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value",
)


class QLABLightningCLI(LightningCLI):
    """``LightningCLI`` for lightning-qlab: any model and datamodule by class path, help that
    lists the package's models, datamodules and configs, and no top-level ``--optimizer``.

    Lightning's automatic ``--optimizer``/``--lr_scheduler`` groups are switched off: QLABGrad
    runs inside the model (manual optimization), and a baseline optimizer is chosen with the
    model's own ``optimizer`` argument (``model.init_args.optimizer`` in YAML; see
    ``configs/baselines/``), so that one module serves both.

    Example:
        >>> cli = QLABLightningCLI(args=["--config", "configs/mnist_mlp.yaml"], run=False)  # doctest: +SKIP
        >>> cli.trainer.fit(cli.model, cli.datamodule)  # doctest: +SKIP
    """

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs: Any) -> None:
        catalogue = describe_catalogue()
        parser_kwargs = {
            "formatter_class": _HelpFormatter,
            "description": "Train, validate, test and predict with QLABGrad (lightning-qlab).\n\n"
            + catalogue,
            **{subcommand: {"formatter_class": _HelpFormatter, "epilog": catalogue}
               for subcommand in OUR_SUBCOMMANDS},
        }
        parser_kwargs.update(kwargs.pop("parser_kwargs", None) or {})
        super().__init__(
            parser_class=QLABArgumentParser,
            # None: any LightningModule / LightningDataModule by class path; data is optional
            # (a module may bring its own dataloaders).
            model_class=None,
            datamodule_class=None,
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # Caught here rather than deep inside fit: a model and data set that disagree on the
        # number of classes is a configuration error.
        model_classes = getattr(self.model, "num_classes", None)
        data_classes = getattr(self.datamodule, "num_classes", None)
        if isinstance(model_classes, int) and isinstance(data_classes, int) and model_classes != data_classes:
            raise _ConfigError(
                f"the data ({type(self.datamodule).__name__}) has {data_classes} classes but the "
                f"model ({type(self.model).__name__}) has num_classes={model_classes}; set "
                f"model.init_args.num_classes (and the backbone's num_classes) to {data_classes}."
            )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # jsonargparse reports a YAML syntax error without the file it was in; find it first.
        words = sys.argv[1:] if args is None else list(args) if isinstance(args, (list, tuple)) else []
        for path in _config_files(words):
            _check_yaml(path, parser.prog, _subcommand(words))
        spelled = null_settings_as_mappings(words)
        if spelled != words:  # parsed here: LightningCLI warns when given args beside sys.argv
            self.config = parser.parse_args(spelled)
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            # LightningCLI reads the checkpoint's hyperparameters next: a bad file must fail here first.
            path = self.config[subcommand].get("ckpt_path")
            if path not in (None, "last", "best", "hpc"):
                read_checkpoint(path, self.config[subcommand].get("weights_only"))

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with what exact resume and preemption need unless the configuration has
        it already: every training batch seeded from its place in training
        (:class:`~lightning_qlab.seeding.StepSeeding`), ``last.ckpt`` written on SIGTERM
        (:class:`~lightning_qlab.preemption.Preemption`), and by every ``ModelCheckpoint`` whose
        ``save_last`` was left unset, so that ``--ckpt_path last`` has a file to find."""
        trainer = super().instantiate_trainer(**kwargs)
        for kind in (StepSeeding, Preemption):
            if not any(isinstance(callback, kind) for callback in trainer.callbacks):
                trainer.callbacks.append(kind())
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None:
                callback.save_last = True
        return trainer

    def before_fit(self) -> None:
        self._resolve_checkpoint(resuming=True)

    def before_validate(self) -> None:
        self._resolve_checkpoint(resuming=False)

    def before_test(self) -> None:
        self._resolve_checkpoint(resuming=False)

    def before_predict(self) -> None:
        """``lightning predict`` writes what it predicts to the run folder (unless a writer of the
        user's own is on the Trainer)."""
        self._resolve_checkpoint(resuming=False)
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def _resolve_checkpoint(self, resuming: bool) -> None:
        """``--ckpt_path last``: the newest last.ckpt of the runs under the same root (Lightning's
        own looks in the new run's folder only). Any local checkpoint is checked against the model
        here, before a run folder exists, so that a bad one is one line (:class:`CheckpointError`)."""
        config = self.config_init[self.subcommand]
        path = config.get("ckpt_path")
        if path == "last":
            found = find_last_checkpoint(self.trainer)
            if found is None:
                raise CheckpointError(
                    f"--ckpt_path last: no last.ckpt in {' or '.join(checkpoint_folders(self.trainer))}: no "
                    "run under this root has saved one. Start without --ckpt_path, or give a checkpoint file."
                )
            rank_zero_info(f"--ckpt_path last: {'resuming' if resuming else 'using'} {found}, the newest "
                           f"last.ckpt under {self.trainer.default_root_dir}")
            config["ckpt_path"] = path = str(found)
        elif path == "best":
            raise CheckpointError(
                "--ckpt_path best names the best checkpoint of a fit run in the same process; from the command "
                "line give the checkpoint file (or `last`)."
            )
        if path is not None:
            check_checkpoint(path, self.model, resuming=resuming, weights_only=config.get("weights_only"))

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as error:
            # A class rejected its arguments (a negative batch size, a GPU preset on a machine
            # without GPUs): the configuration is wrong, not the program; report it like a
            # parse error.
            raise _ConfigError(summarise_parse_error(str(error))) from error


class _ConfigError(Exception):
    """A class rejected the arguments the configuration gave it."""


def describe_catalogue() -> str:
    """The models, datamodules, backbones and configs this package offers, for ``--help``."""
    models = ["ImageClassifier", "LanguageModel"]
    backbones = [name for name in qlab_models.__all__ if name not in (*models, "QLABModel")]
    datamodules = [name for name in qlab_data.__all__
                   if name.endswith("DataModule") and name != "ImageClassificationDataModule"]
    lines = ["Models (--model NAME, or model.class_path: lightning_qlab.models.NAME in YAML):"]
    lines += _describe_classes(qlab_models, models)
    lines.append("Backbones (model.init_args.backbone.class_path: lightning_qlab.models.NAME; "
                 "any torch.nn.Module works):")
    lines += _describe_classes(qlab_models, backbones)
    lines.append("DataModules (--data NAME, or data.class_path: lightning_qlab.data.NAME in YAML):")
    lines += _describe_classes(qlab_data, datamodules)
    configs = sorted(CONFIGS_DIR.rglob("*.yaml")) if CONFIGS_DIR.is_dir() else []
    lines.append(f"Configs in {_display_path(CONFIGS_DIR.parent)} (--config FILE, repeatable: later "
                 "files override earlier ones):")
    if configs:
        for path in configs:
            lines.append(f"  {str(path.relative_to(CONFIGS_DIR.parent)):<32} {_first_comment(path)}")
    else:
        lines.append("  (none found: the configs/ folder ships with the source checkout)")
    lines.append("Any other LightningModule or LightningDataModule works by its full class path too.")
    return "\n".join(lines)


def _describe_classes(package: Any, names: list[str]) -> list[str]:
    """``  Name   first sentence of its docstring`` for each class."""
    described = []
    for name in names:
        doc = " ".join((getattr(package, name).__doc__ or "").strip().split("\n\n")[0].split())
        summary = doc.split(". ")[0].rstrip(".")
        described.append(f"  {name:<32} {summary}")
    return described


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (``.`` for the same)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _first_comment(path: Path) -> str:
    """The first ``#`` comment line of a config file: its one-line description."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


def _config_files(words: list[str]) -> list[Path]:
    """The existing files given to ``--config`` in a command line."""
    files = []
    for index, word in enumerate(words):
        value = None
        if word == "--config" and index + 1 < len(words):
            value = words[index + 1]
        elif word.startswith("--config="):
            value = word.split("=", 1)[1]
        if value is not None and Path(value).is_file():
            files.append(Path(value))
    return files


# A QLABConfig setting set to null on the command line; jsonargparse 4.x, in subclass mode, reads
# ``--model.init_args.qlab_config.relative_update null`` as the string 'None' and drops the rest of
# the YAML's qlab_config, while the one-key mapping ``{relative_update: null}`` merges as it should.
_SETTING = re.compile(r"^(--\S*qlab_config)\.([A-Za-z_]\w*)$")
_NULLS = ("null", "Null", "NULL", "None", "none", "~")


def null_settings_as_mappings(words: list[str]) -> list[str]:
    """The command line with each ``--....qlab_config.<setting> null`` (or ``=null``) spelled as
    ``--....qlab_config {<setting>: null}``, the form that keeps the configuration's other settings.

    Example:
        >>> null_settings_as_mappings(["fit", "--model.init_args.qlab_config.relative_update", "null",
        ...                            "--model.qlab_config.probe_every=None", "--trainer.max_steps", "null"])
        ['fit', '--model.init_args.qlab_config', '{relative_update: null}', '--model.qlab_config', '{probe_every: null}', '--trainer.max_steps', 'null']
    """
    spelled: list[str] = []
    index = 0
    while index < len(words):
        key, equals, value = words[index].partition("=")
        if not equals:
            value = words[index + 1] if index + 1 < len(words) else ""
        setting = _SETTING.match(key)
        if setting and value in _NULLS:
            spelled += [setting[1], f"{{{setting[2]}: null}}"]
            index += 1 if equals else 2
        else:
            spelled.append(words[index])
            index += 1
    return spelled


def _subcommand(words: list[str]) -> str:
    return next((word for word in words if word in OUR_SUBCOMMANDS), "")


def _check_yaml(path: Path, prog: str, subcommand: str) -> None:
    """Fail with ``file, line L, column C: problem`` when ``path`` is not valid YAML."""
    try:
        with open(path, encoding="utf-8") as handle:
            yaml.safe_load(handle)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(part for part in (error.problem, f"({error.context})" if error.context else "") if part)
        _fail(f"{prog} {subcommand}".strip(), f"invalid configuration: {where}: {what}", EXIT_BAD_CONFIG)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        _fail(f"{prog} {subcommand}".strip(), f"invalid configuration: {path}: {' '.join(str(error).split())}",
              EXIT_BAD_CONFIG)


def _debugging() -> bool:
    """jsonargparse's debug switch (``JSONARGPARSE_DEBUG=true``): errors with their traceback."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"


def _fail(prog: str, message: str, status: int) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def main(args: Optional[Sequence[str]] = None, prog: str = "lightning-qlab") -> None:
    """Entry point of the ``lightning-qlab`` command (fit, validate, test, predict).

    Args:
        args: the command line without the program name; ``None`` reads ``sys.argv``.
        prog: the program name shown in messages.

    Example:
        >>> main(["fit", "--config", "configs/mnist_mlp.yaml", "--trainer.fast_dev_run", "true"])  # doctest: +SKIP
    """
    group_was_ours = not _in_process_group()
    if _debugging():
        QLABLightningCLI(args=args, parser_kwargs={"prog": prog})
    else:
        _run(args, prog)
    if group_was_ours:
        leave_process_group()


def _run(args: Optional[Sequence[str]], prog: str) -> None:
    command = f"{prog} {_subcommand(list(sys.argv[1:] if args is None else args))}".strip()
    try:
        QLABLightningCLI(args=args, parser_kwargs={"prog": prog})
    except _ConfigError as error:
        _fail(command, f"invalid configuration: {error}", EXIT_BAD_CONFIG)
    except MisconfigurationException as error:
        # Raised by Lightning (or the QLAB mixin) once the run starts, for settings that do not
        # work together, e.g. Trainer(accumulate_grad_batches=4) with QLABGrad's manual
        # optimization; the message says what to use instead.
        _fail(command, f"invalid configuration: {' '.join(str(error).split())}", EXIT_BAD_CONFIG)
    except (DataNotFoundError, DataMismatchError, CheckpointError) as error:
        _fail(command, " ".join(str(error).split()), EXIT_DATA)


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def leave_process_group() -> None:
    """Tear down the process group a run set up, once every rank is done with it.

    Lightning leaves it for the interpreter's exit, where gloo's threads can be destroyed while
    still joinable and abort the process (``terminate called without an active exception``)
    after a run that succeeded. The garbage collection first frees what the finished runs left in
    reference cycles (trainers, strategies, sharded modules), which may hold the groups and their
    pending work, so that destroying the groups here does end their threads. The barrier keeps a
    rank from leaving while another is still in its last collective. The command calls it after
    its run; a script that runs ``Trainer.fit`` on several processes itself can call it at its end.
    """
    if _in_process_group():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def lightning_main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``lightning`` command.

    ``fit``/``validate``/``test``/``predict`` (and ``--help``) run :func:`main`; any other
    subcommand goes to the Lightning AI platform CLI of ``lightning_sdk`` when it is installed,
    and otherwise ends with a message saying how to get it.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0].startswith("-") or words[0] in OUR_SUBCOMMANDS:
        # None lets LightningCLI read sys.argv itself (it warns when given both).
        main(None if argv is None else words, prog="lightning")
        return
    _hand_to_lightning_sdk(words)


def _hand_to_lightning_sdk(argv: list[str]) -> None:
    if importlib.util.find_spec("lightning_sdk") is None:
        _fail(
            "lightning",
            f"{argv[0]!r} is not a lightning-qlab command (those are {', '.join(OUR_SUBCOMMANDS)}). "
            "Other subcommands belong to the Lightning AI platform CLI: pip install lightning-sdk",
            EXIT_BAD_CONFIG,
        )
    try:
        from lightning_sdk.cli.entrypoint import main_cli
    except ImportError as error:
        _fail(
            "lightning",
            f"lightning_sdk is installed but its CLI could not be loaded ({error}); "
            "run its commands through lightning_sdk's own entry point.",
            EXIT_BAD_CONFIG,
        )
    # lightning_sdk's CLI reads sys.argv, as when it is installed as the `lightning` command.
    sys.argv = ["lightning", *argv]
    status = main_cli()
    if status not in (None, 0):
        raise SystemExit(status)


if __name__ == "__main__":
    lightning_main()
