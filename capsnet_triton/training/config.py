"""The training command line and the run configuration it resolves to.

A run's configuration is a plain dict of the options (argparse's names), stored in every
checkpoint. A resumed run takes it from last.pt and accepts only the options of RESUMABLE.
"""

import argparse
import contextlib
import math
import os

from ..data import DATASETS, dataset_spec
from .checkpoint import (CHECKPOINT_FILES, LOCK_NAME, best_model_in, load_checkpoint, load_training_state,
                         lock_run_folder)
from .distributed import launched_rank, launched_world_size, resolve_device
from .errors import ArgumentParser
from .starting import command_name
from .log import logged_prefix, logged_results

__all__ = ["RESUMABLE", "MAX_LR", "MAX_SEED", "HelpFormatter", "build_parser", "check_config", "check_run_config",
           "resolve_config", "missing_data_folder", "unwritable_folder"]

# Options a resumed run may change: they do not alter the trajectory of the parameters, except
# --device and --digitcaps (the same function, rounded differently, so a run resumed with another
# choice loses bit-exactness), as does another number of torchrun processes (the run says so).
# Every other option is part of the run and must match the checkpoint's.
RESUMABLE = ("data", "download", "verify_data", "epochs", "device", "digitcaps", "checkpoint_every",
             "log_every", "limit_test", "verbose")

# The largest --lr accepted: Adam steps of this size already wreck a trained CapsNet.
MAX_LR = 1.0

# The largest --seed: NumPy's global generator (np.random.seed) takes 32-bit seeds.
MAX_SEED = 2**32 - 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for switches (whose default is simply "off")."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def build_parser(suppress_defaults=False):
    """The command-line parser. With suppress_defaults, options not given are absent from the
    result, which is how a resumed run tells what the user changed from what they left out."""
    parser = ArgumentParser(
        prog=command_name("capsnet-train", "capsnet_triton.train"),
        description="Train CapsNet with dynamic routing (Sabour et al. 2017) on MNIST, Fashion-MNIST, "
                    "MultiMNIST or MNIST on 40x40.",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=HelpFormatter,
    )

    def add(group, *flags, default=None, **kwargs):
        if not suppress_defaults:
            kwargs["default"] = default
        group.add_argument(*flags, **kwargs)

    data = parser.add_argument_group("data")
    add(data, "--data", metavar="DIR", help="folder with the IDX files (flat, or torchvision's MNIST/raw layout)")
    trainable = sorted(name for name, spec in DATASETS.items() if not spec.test_only)
    add(data, "--dataset", default="mnist", choices=trainable,
        help="which dataset's files to load (affnist and affnist-generated are test sets: see "
             "python -m capsnet_triton.evaluate)")
    # Both switches have a --no- form too, so that a resumed run, which keeps the run's choice
    # unless told, can turn either back.
    add(data, "--download", default=False, action=argparse.BooleanOptionalAction,
        help="fetch the .gz files from the canonical mirrors into DIR/<MNIST|FashionMNIST>/raw, "
             "keeping those already there that pass their checksum")
    add(data, "--verify-data", default=True, action=argparse.BooleanOptionalAction,
        help="check the MD5s of the dataset's four files before training (on by default; --no-verify-data "
             "for deliberately modified data)")
    add(data, "--validation-size", default=5000, type=int, help="training images held out for model selection")
    add(data, "--split-seed", default=0, type=int, help="seed of the validation split (fixed across runs)")
    add(data, "--max-shift", default=2, type=int, help="random shift augmentation in pixels (0: none); "
        "the default is 6 for mnist40 (a digit anywhere on its 40x40 canvas) and 4 for multimnist (each digit "
        "of a pair, SPEC 9)")
    add(data, "--limit-train", type=int, metavar="N", help="train on N images of the shuffled training split only "
        "(smoke runs; multimnist: N training digits, each the first of a pair)")
    add(data, "--limit-val", type=int, metavar="N", help="validate on N images (multimnist: pairs) only")
    add(data, "--limit-test", type=int, metavar="N", help="test on N images (multimnist: pairs) only")

    optim = parser.add_argument_group("optimisation")
    add(optim, "--epochs", default=50, type=int,
        help="passes over the training split (the paper gives no length; the official code's README "
             "trains 300,000 steps of 128, --epochs 700 here)")
    add(optim, "--batch-size", default=128, type=int, help="global batch, split over the ranks")
    add(optim, "--lr", default=1e-3, type=float, help="Adam learning rate; its decay stops at 1e-6 (or at "
        "--lr, where that is smaller)")
    add(optim, "--lr-decay", default=0.96, type=float, help="learning rate factor per --lr-decay-steps")
    add(optim, "--lr-decay-steps", default=2000, type=int, help="steps per --lr-decay factor (applied "
        "continuously); the default is 20000 for multimnist (SPEC 9: 10x longer)")
    add(optim, "--reconstruction-weight", default=0.0005, type=float, help="weight of the reconstruction loss")
    add(optim, "--seed", default=0, type=int, help="seed of the initialisation, the batch order and the shifts")
    add(optim, "--amp", default=False, action="store_true", help="bfloat16 autocast")

    model = parser.add_argument_group("model")
    add(model, "--routing-iterations", default=3, type=int, help="r of Procedure 1")
    add(model, "--routing-gradient", default="full", choices=["full", "last"],
        help="full: the gradient flows through every routing iteration (the official code); "
             "last: only through the last, u_hat held constant in the earlier ones (SPEC 3)")
    add(model, "--routing-bias", default=False, action="store_true", help="learned bias added to s_j")
    add(model, "--no-decoder", dest="decoder", default=True, action="store_false", help="no reconstruction network")
    add(model, "--conv-channels", default=256, type=int, help="channels of Conv1")
    add(model, "--primary-types", default=32, type=int, help="capsule types of PrimaryCaps")
    add(model, "--decoder-hidden", default=[512, 1024], type=int, nargs=2, metavar=("H1", "H2"),
        help="widths of the decoder's two hidden layers")

    run = parser.add_argument_group("run")
    add(run, "--out", default="runs/capsnet", metavar="RUN_DIR", help="folder of the log, checkpoints and figures")
    add(run, "--resume", default=False, action="store_true", help="continue the run in RUN_DIR from last.pt")
    add(run, "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    add(run, "--digitcaps", default="fused", choices=["fused", "unfused"],
        help="fused: DigitCaps as capsule_linear, u_hat never in memory; unfused: predict then "
             "dynamic_routing, the same function with u_hat [B, I, J, D] in memory, faster on a GPU for now")
    add(run, "--checkpoint-every", default=500, type=int, metavar="STEPS",
        help="also checkpoint every STEPS steps (0: only at epoch ends)")
    add(run, "--log-every", default=50, type=int, metavar="STEPS",
        help="steps per 'train' record of the log (also how often a NaN or infinite loss is looked for)")
    add(run, "--verbose", default=False, action="store_true", help="show the traceback of an error")
    return parser


def check_config(config, error):
    """Call error(message) for the first option of `config` out of its range."""
    def flag(key):
        return f"--{key.replace('_', '-')}"

    positive = ("epochs", "batch_size", "lr_decay_steps", "routing_iterations", "conv_channels",
                "primary_types", "validation_size", "log_every")
    for key in positive:
        if config[key] < 1:
            error(f"{flag(key)} must be positive, got {config[key]}")
    for key in ("limit_train", "limit_val", "limit_test"):
        if config[key] is not None and config[key] < 1:
            error(f"{flag(key)} must be positive, got {config[key]}")
    if config["limit_train"] is not None and config["limit_train"] < config["batch_size"]:
        # Refused here, before the data is read; the loop still checks a split smaller than asked.
        error(f"--limit-train {config['limit_train']} does not fill one batch of {config['batch_size']}: "
              f"lower --batch-size or raise --limit-train")
    world = launched_world_size()
    if config["batch_size"] % world:
        # --batch-size is the global batch and a resumed run keeps it: the process count must fit it.
        error(f"--batch-size {config['batch_size']} is split over the {world} processes torchrun started and must "
              f"be a multiple of their number: start a number of processes that divides it")
    for key in ("checkpoint_every", "max_shift", "seed", "split_seed"):
        if config[key] < 0:
            error(f"{flag(key)} must not be negative, got {config[key]}")
    if config["seed"] > MAX_SEED:
        error(f"--seed must be at most {MAX_SEED}, got {config['seed']}")
    spec = DATASETS[config["dataset"]]
    _, height, width = spec.image_shape
    if config["max_shift"] > min(height, width) // 4:
        error(f"--max-shift must be at most {min(height, width) // 4} pixels (a quarter of the "
              f"{config['dataset']} image), got {config['max_shift']}")
    if spec.digit_shape and config["max_shift"] > (height - spec.digit_shape[1]) // 2:
        # A smaller digit centred on a larger canvas (MultiMNIST, mnist40): a larger shift would
        # push part of it off the canvas.
        error(f"--max-shift must be at most {(height - spec.digit_shape[1]) // 2} pixels for {config['dataset']} "
              f"(a {spec.digit_shape[1]}x{spec.digit_shape[2]} digit on a {height}x{width} canvas), "
              f"got {config['max_shift']}")
    if not (math.isfinite(config["lr"]) and 0 < config["lr"] <= MAX_LR):
        error(f"--lr must be a number in (0, {MAX_LR}], got {config['lr']}")
    if not 0 < config["lr_decay"] <= 1:
        error(f"--lr-decay must be in (0, 1], got {config['lr_decay']}")
    weight = config["reconstruction_weight"]
    if not (math.isfinite(weight) and weight >= 0):
        error(f"--reconstruction-weight must be a finite number >= 0, got {weight}")
    if min(config["decoder_hidden"]) < 1:
        error(f"--decoder-hidden widths must be positive, got {config['decoder_hidden']}")


def _of_its_kind(value, action):
    """Whether a checkpoint's config value could have come from the option `action`."""
    if action.nargs == 2:
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_a(x, action.type) for x in value)
    if action.choices is not None:
        return value in action.choices
    if value is None:
        return action.default is None
    return _is_a(value, action.type or type(action.default))


def _is_a(value, kind):
    """isinstance, where a bool is no number and an int is a float too, as argparse's types read them."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def check_run_config(config, path):
    """ValueError, in one line naming `path`, unless a checkpoint's config holds every option that
    is part of a run (all but RESUMABLE's, which a resumed run fills with their defaults, and
    "out") with a value the option could have given: a checkpoint of another version, or edited,
    would otherwise fail later with a KeyError or TypeError deep in the run."""
    for action in build_parser()._actions:
        key = action.dest
        if key in RESUMABLE or key in ("help", "out", "resume"):
            continue
        if key not in config:
            raise ValueError(f"{path}: its run configuration lacks --{key.replace('_', '-')} (written by another "
                             f"version of capsnet_triton, or edited?)")
        if not _of_its_kind(config[key], action):
            raise ValueError(f"{path}: its run configuration has --{key.replace('_', '-')} {config[key]!r}, which "
                             f"that option cannot take (written by another version of capsnet_triton, or edited?)")


def missing_data_folder(folder, recorded_in=None, download=False):
    """None where the data folder `folder` is there (or, with download, will be made), else a
    usage error's message: said before any work (and before a run folder is made for nothing).
    recorded_in: the checkpoint that gave the folder, where the user did not (--resume,
    evaluate), whose folder may have moved since."""
    if os.path.isdir(folder) or (download and not os.path.exists(folder)):
        return None
    state = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
    if recorded_in is None:
        return f"--data {folder} {state}"
    return (f"the run's data folder {folder}, as {recorded_in} records it, {state} (moved or deleted?): "
            f"pass --data DIR where its files are now")


def unwritable_folder(path, what, create=True):
    """None where `path` is a folder this process can write, or has now been made one (create),
    or could be made one (not create: nothing is made, so a command that fails later leaves no
    empty folder); else why not, calling it `what`."""
    if create:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"cannot create {what}: {path} is a file"
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            return f"cannot create {what} ({e.strerror or e})"
    else:
        existing = os.path.abspath(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            return f"cannot create {what} ({existing} is not a folder)"
        if existing != os.path.abspath(path):
            path = existing                    # to be made in the nearest folder that exists
            what = f"{existing}, where {what} would be made,"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{what} is not writable"
    return None


def _claim_out(out, error, lock):
    """Call error(message) unless `out` is (or can be made) a folder this process can write and,
    on the main rank (the one that writes it), its lock (`checkpoint.lock_run_folder`) is free;
    the lock goes into the ExitStack `lock`."""
    problem = unwritable_folder(out, "the run folder")
    if problem:
        error(f"--out {out}: {problem}")
    if launched_rank() == 0:
        try:
            lock.enter_context(lock_run_folder(out))
        except ValueError as e:
            error(str(e))


def _check_best_model(run_dir, last, error):
    """Call error(message) unless RUN_DIR/best.pt is the best model that last.pt records: the run
    tests it at the end, so a missing or foreign one would otherwise show only after the
    remaining epochs. Where last.pt holds that model itself, the resumed run writes best.pt
    from it (checkpoint.best_model_in), whatever the file holds now."""
    if best_model_in(last) is not None:
        return
    path = os.path.join(run_dir, "best.pt")
    recorded = last["best"]
    advice = (f"the run's final test needs its best model (epoch {recorded['epoch']}): restore that file, "
              f"or start a new run in another --out")
    try:
        best = load_checkpoint(path)
    except ValueError as e:
        error(f"--resume: {e}; {advice}")
    # "out" may differ: a run folder can be moved between invocations.
    part_of_the_run = [key for key in last["config"] if key not in RESUMABLE and key != "out"]
    if ((best.get("epoch"), best.get("validation", {}).get("accuracy")) != (recorded["epoch"], recorded["accuracy"])
            or any(best["config"].get(key) != last["config"][key] for key in part_of_the_run)):
        error(f"--resume: {path} is not the best model that last.pt records (another epoch's or another "
              f"run's); {advice}")


def _as_typed(setting):
    """An option's value as the command line takes it: 8 16 for --decoder-hidden's [8, 16]."""
    return " ".join(map(str, setting)) if isinstance(setting, (list, tuple)) else setting


def _resumed_config(last, args, explicit, parser):
    """(config, checkpoint) of --resume: the configuration of last.pt (at `last`) with the
    RESUMABLE options given."""
    try:
        checkpoint = load_training_state(last)
        check_run_config(checkpoint["config"], last)
        if launched_rank() == 0:             # the rank that writes the log: a bad one is refused before any work
            logged_prefix(os.path.join(os.path.dirname(last), "log.jsonl"), checkpoint)
    except (OSError, ValueError) as e:      # OSError: a log this process may not read
        parser.error(f"--resume: {e}")
    config = dict(checkpoint["config"])
    for key, value in explicit.items():
        if key in RESUMABLE:
            config[key] = value
        elif key not in ("out", "resume") and value != config[key]:
            option = next(action for action in parser._actions if action.dest == key)
            # A flag (--amp, --no-decoder) that is not resumable was left out when the run started.
            given = (f"{option.option_strings[0]}, which the run was started without," if option.nargs == 0
                     else f"{option.option_strings[0]} {_as_typed(value)}, which differs from the run's "
                          f"{_as_typed(config[key])},")
            parser.error(f"{given} cannot be given to --resume: a resumed run keeps its training configuration")
    config["out"] = args.out
    for key in RESUMABLE:                   # options newer than the checkpoint: their defaults
        config.setdefault(key, parser.get_default(key))
    config["verbose"] = args.verbose        # how errors show is this invocation's choice
    position = checkpoint["position"]
    started = position["epoch"] + (position["step_in_epoch"] > 0)
    if config["epochs"] < started:
        parser.error(f"--epochs {config['epochs']} is fewer than the {started} epochs this run has started; "
                     f"pass --epochs {started} or more")
    if checkpoint["best"]["epoch"] > 0:
        _check_best_model(args.out, checkpoint, parser.error)
    return config, checkpoint


def resolve_config(argv, parser):
    """(config, checkpoint, lock): the run configuration; with --resume, the checkpoint it
    continues from (else None); and a context manager that holds the run folder's lock, taken
    before anything in the folder is read or written, until the command leaves it.

    Bad options end the program through parser.error (exit 2), and so do, before any work, a run
    folder that another run is writing and, with --resume, checkpoints that cannot continue the run.
    """
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    last = os.path.join(args.out, "last.pt")
    checkpoint = None
    with contextlib.ExitStack() as lock:    # released here on an error, else handed to the caller
        if args.resume:
            if not os.path.isfile(last):
                if os.path.exists(os.path.join(args.out, LOCK_NAME)):
                    # A run that is still starting there holds the lock before it saves last.pt.
                    _claim_out(args.out, parser.error, lock)
                parser.error(f"--resume: there is no checkpoint {last} to continue")
            _claim_out(args.out, parser.error, lock)
            config, checkpoint = _resumed_config(last, args, explicit, parser)
        else:
            config = {key: value for key, value in vars(args).items() if key != "resume"}
            if not config["decoder"] and "reconstruction_weight" in explicit:
                parser.error("--reconstruction-weight weighs the decoder's loss, which --no-decoder leaves out")
            # The dataset's own defaults (data.DatasetSpec.defaults) for the options left out.
            for key, value in dataset_spec(config["dataset"]).defaults.items():
                if key not in explicit:
                    config[key] = value
        if config["data"] is None:
            parser.error("--data DIR is required (the folder with the MNIST IDX files)")
        config["data"] = os.path.abspath(config["data"])
        problem = missing_data_folder(config["data"], None if "data" in explicit else "last.pt", config["download"])
        if problem:
            parser.error(problem)
        check_config(config, parser.error)
        try:
            resolve_device(config["device"])
        except ValueError as e:
            parser.error(str(e))
        if not args.resume:
            _claim_out(config["out"], parser.error, lock)
            # Under the lock: a run that wrote these here has ended, or is still holding them. A
            # new run would write over them, and over the log and figures beside them: best.pt
            # is a run's result even where its last.pt was deleted (three times best.pt's size),
            # and so is a log with validation or test records where both were. A log of "train"
            # records alone, of a run that stopped before its first epoch ended, is replaced.
            held = [name for name in CHECKPOINT_FILES if os.path.exists(os.path.join(config["out"], name))]
            try:
                results = logged_results(os.path.join(config["out"], "log.jsonl"))
            except OSError as e:
                parser.error(f"{args.out}: cannot read its log.jsonl ({e.strerror or e})")
            if results:
                held.append(f"log.jsonl with {' and '.join(results)} results")
            if held:
                resume = "pass --resume to continue it, or " if "last.pt" in held else ""
                start_over = "" if len(held) > 1 or not results else " (or delete its log.jsonl to start over there)"
                parser.error(f"{args.out} already holds a run ({', '.join(held)}): {resume}choose another --out"
                             f"{start_over}")
        return config, checkpoint, lock.pop_all()
