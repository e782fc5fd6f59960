"""Red Heart pipeline: one subcommand per stage, every output under <run.output_root>/<run.name>/.

    python run.py all                                   every stage on configs/default.yaml
    python run.py sweep configs/default.yaml sweep.epochs=3 run.output_root=/data/runs

A config file (default configs/default.yaml), then key=value overrides of any field.
An error a user can cause prints one message (--debug: with its traceback).
"""

import argparse
import sys
from pathlib import Path

from redheart_tune.tune.auth import ask_for_token_auth  # imports no Ray: Ray reads RAY_AUTH_MODE once
from redheart_tune.tune.dashboard import start_dashboard
from redheart_tune.util.console import plain_ray_output

CONFIGS = Path(__file__).resolve().parent / "configs"  # in the package (configs/ at the checkout root links here)
DEFAULT_CONFIG = CONFIGS / "default.yaml"
RESUME_HELP = "the experiment, then overrides of optim.lr, optim.grad_clip, memory.*, resources.*"


class Parser(argparse.ArgumentParser):  # a bad argument is one line saying where to look, not the usage block
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def split(ns: argparse.Namespace, what: str = "config file") -> tuple[str | None, list[str]]:
    """The one argument without '=' (a config file, or resume's experiment), and the key=value overrides."""
    paths = [a for a in ns.args if "=" not in a]
    if len(paths) > 1:
        ns.parser.error(f"one {what}, then key=value overrides; got {paths}")
    return (paths[0] if paths else None), [a for a in ns.args if "=" in a]


def config_file(path: str | None) -> Path:
    """The config file given, or the default; ``configs/smoke.yaml`` or ``smoke.yaml`` that is not a file
    here is the shipped one, so the installed ``redheart-tune`` runs the README's commands anywhere."""
    if path is None:
        return DEFAULT_CONFIG
    given = Path(path)
    shipped = CONFIGS / given.name
    if not given.is_file() and given.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    return given


def load(ns: argparse.Namespace):  # paths made absolute once, here: trials may run elsewhere
    from redheart_tune.config import load_config, resolve_paths

    path, overrides = split(ns)
    return resolve_paths(load_config(config_file(path), overrides))


def locked(cfg):  # one driver at a time per run directory; a second one refuses (redheart_tune/pipeline/runlock.py)
    from redheart_tune.layout import run_dir
    from redheart_tune.pipeline.runlock import run_lock

    return run_lock(run_dir(cfg), cfg.run.name)


def explicit_lr(ns: argparse.Namespace) -> bool:  # optim.lr=... given: no sweep result is used
    return any(a.startswith("optim.lr=") for a in ns.args)


# Each command loads and validates its config before it imports the stages: they import torch and Ray
# (seconds), and a typo in a key is reported before either is loaded.


def cmd_stage(ns):
    cfg = load(ns)
    with locked(cfg):
        from redheart_tune.pipeline.stages import (
            BY_NAME,  # sweep, analyze, crossover, report: their stage on the config
        )

        BY_NAME[ns.command](cfg)


def cmd_train(ns):
    cfg = load(ns)
    with locked(cfg):
        from redheart_tune.pipeline.stages import train_stage
        from redheart_tune.tune.train import choose_lr, with_lr

        lr, source = choose_lr(cfg, explicit_lr=explicit_lr(ns), lr_from=ns.lr_from)
        train_stage(with_lr(cfg, lr), source)


def cmd_resume(ns):
    from redheart_tune.config import load_config
    from redheart_tune.layout import experiment_dir
    from redheart_tune.pipeline.stages import resume_stage

    where, overrides = split(ns, "experiment directory")
    resume_stage(where or experiment_dir(load_config(DEFAULT_CONFIG), "train"), overrides)


def cmd_all(ns):
    cfg = load(ns)
    with locked(cfg):
        from redheart_tune.pipeline.stages import all_stages

        all_stages(cfg, seeds=ns.seeds, explicit_lr=explicit_lr(ns))


def cmd_status(ns):
    cfg = load(ns)
    from redheart_tune.pipeline.status import print_status

    print_status(cfg, " ".join(ns.args), watch_s=ns.watch)


def cmd_prepare(ns):
    cfg = load(ns)
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data, prepare_holdout

    where = cache_dir(cfg)
    print(prepare_data(cfg.data, where, show_progress=True).summary())
    holdout = prepare_holdout(cfg.data, where, show_progress=True)
    if holdout is not None:
        print(holdout.summary())
    print(f"data cache: {where}; a machine without the encoder or the internet takes it as data.cache_dir")


def cmd_params(ns):
    cfg = load(ns)
    from redheart_tune.engine.memory import params_text

    print(params_text(cfg, as_json=ns.json))


def build_parser() -> Parser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=Parser)
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    configured = Parser(add_help=False, parents=[common])
    configured.add_argument("args", nargs="*", metavar="[config.yaml] [key=value]", help="config, overrides")
    launch = Parser(add_help=False, parents=[configured])  # the stages that train: Ray, and its dashboard
    launch.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1")

    def add(name: str, func, about: str, parent: Parser = configured) -> Parser:
        sub = commands.add_parser(name, parents=[parent], help=about, description=about)
        sub.set_defaults(func=func, parser=sub)
        return sub

    add("sweep", cmd_stage, "phase 1: the LR sweep", launch)
    train = add("train", cmd_train, "phase 2: the long training run", launch)
    train.add_argument("--lr-from", type=Path, metavar="PATH", help="a sweep's best_lr.json (or its run dir)")
    resume = add("resume", cmd_resume, "continue an interrupted sweep or training experiment", common)
    resume.add_argument("args", nargs="*", metavar="[<run dir>/train] [key=value]", help=RESUME_HELP)
    add("analyze", cmd_stage, "phase 3: sweet spots and figures")
    add("crossover", cmd_stage, "phase 4: the crossover model")
    add("report", cmd_stage, "test-split evaluation of every method")
    every = add("all", cmd_all, "every stage; finished ones are reused, an interrupted one resumed", launch)
    every.add_argument("--seeds", type=positive_int, default=1, help="train N seeds (default 1)")
    status = add("status", cmd_status, "where the run stands, and the next command")
    status.add_argument("--watch", nargs="?", const=10, type=float, metavar="S", help="every S seconds (10)")
    add("prepare", cmd_prepare, "fetch and encode the data and the held-out set into data.cache_dir")
    params = add("params", cmd_params, "parameters per module and group, memory estimate")
    params.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def user_error(exc: Exception) -> bool:
    """One a user can cause (analysis.stages.USER_ERRORS), printed as one message.  A config error is told
    without importing the stages, which import torch and Ray."""
    from redheart_tune.config import ConfigError
    from redheart_tune.pipeline.runlock import RunInUse

    if isinstance(exc, ConfigError | RunInUse):
        return True
    from redheart_tune.pipeline.stages import USER_ERRORS

    return isinstance(exc, USER_ERRORS)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ask_for_token_auth()  # Ray 2.60's token authentication, on without its warning (docs/monitoring.md)
    plain_ray_output()  # no colour codes in a log file; both read by Ray at import (redheart_tune/util/console.py)
    try:
        if getattr(ns, "dashboard", False):  # Ray starts now, with its dashboard; the stages then use it
            start_dashboard(load(ns))
        ns.func(ns)
    except Exception as exc:
        if ns.debug or not user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; Ray is shut down. python run.py status says how to continue", file=sys.stderr)
        return 130
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
