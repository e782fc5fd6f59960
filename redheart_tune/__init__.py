"""Red Heart on Ray Tune: an LR sweep, one long training, sweet-spot analysis and crossover for the
Red Heart multi-module model, within a GPU memory budget.

Layers, each importing only those below it (tests/test_layers.py checks it):

    cli            the command line (``redheart-tune``, ``python run.py``)
    pipeline       the stages a command runs, the run's status, the driver's run lock
    analysis       pure analysis of finished runs: sweet spots, crossover, soups, selection, evaluation, figures
    tune           the Ray Tune layer: trainable, sweep, train, runner, stored config, callbacks, storage,
                   resources, dashboard
    engine         plain-PyTorch training: loop, checkpoints, progress, memory streaming (engine.memory)
    data           records, splits, encoding
    config, layout the run's config and where its outputs live
    model          the Red Heart model family
    util           files, console, faults
"""

__version__ = "0.1.0"
