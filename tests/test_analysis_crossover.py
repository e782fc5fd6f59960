"""Crossover assembly, variants and group soups on real tiny-model checkpoints of fake epochs (no Ray)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_analysis_support import default_targets, epoch_state, fake_meta, write_fake_run

from redheart_tune.analysis.crossover import build_crossover, shift_spot, variant_spots
from redheart_tune.analysis.experiment import IncompleteCheckpointWarning, verify_checkpoints
from redheart_tune.analysis.soups import build_group_soup, window_members
from redheart_tune.analysis.weights import CrossoverError, check_compatible, load_module_tensors
from redheart_tune.config import Config, config_to_dict
from redheart_tune.engine.checkpoints import CheckpointError, load_group
from redheart_tune.model.groups import GROUPS, param_prefix_owner, selection_units


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    dirs, base = write_fake_run(root)
    good, bad = verify_checkpoints(dirs.values())
    assert not bad
    metas = {info.epoch: info.meta for info in good.values()}
    return dirs, base, metas


def test_crossover_state_equals_the_chosen_checkpoints_tensor_for_tensor(fake_run):
    dirs, base, metas = fake_run
    spots = default_targets()
    model, sources = build_crossover(spots, dirs, metas)
    state = model.state_dict()
    assert len({s["epoch"] for s in sources.values()}) > 3  # really mixes epochs
    covered = set()
    for unit in selection_units():
        epoch = spots[unit.name]
        if unit.group == "independent":
            expected = {
                k: v
                for k, v in load_group(dirs[epoch], "independent").items()
                if param_prefix_owner(k) in unit.modules
            }
        else:
            expected = load_group(dirs[epoch], unit.group)
        assert expected, unit.name
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
            # and it is that epoch's weights, not another's
            torch.testing.assert_close(v, epoch_state(base, epoch)[k], rtol=0, atol=0)
        covered |= set(expected)
    assert covered == set(state)


def test_independent_module_reads_only_its_own_keys(fake_run):
    dirs, _, _ = fake_run
    tensors = load_module_tensors(dirs[2], "independent", ("phase1",))
    assert tensors and all(k.startswith("phase1.") for k in tensors)


def test_variants_shift_the_original_spots_clamped_and_snapped():
    spots = {"group_a": 4, "group_b": 10, "phase0": 12}
    available = [2, 4, 6, 8, 10, 12]
    v = variant_spots(spots, (-4, -2, 0, 2, 4), available)
    assert v[0] == spots
    assert v[-4] == {"group_a": 2, "group_b": 6, "phase0": 8}  # 4-4=0 clamps to the first epoch
    assert v[4] == {"group_a": 8, "group_b": 12, "phase0": 12}  # 14 clamps to the last
    assert v[2] == {"group_a": 6, "group_b": 12, "phase0": 12}
    # Not cumulative: +4 is +4 from the original, not from the +2 variant (which would give 10, 14->12, ...).
    assert v[4]["group_a"] == spots["group_a"] + 4
    assert spots == {"group_a": 4, "group_b": 10, "phase0": 12}  # the input is untouched


def test_shift_snaps_to_an_existing_checkpoint():
    available = [2, 4, 8, 12]  # epochs 6 and 10 are missing (e.g. broken)
    assert shift_spot(4, 2, available) == 4  # 6 is equidistant from 4 and 8: the earlier wins
    assert shift_spot(8, 2, available) == 8
    assert shift_spot(8, 3, available) == 12
    assert shift_spot(2, -10, available) == 2
    with pytest.raises(CrossoverError):
        shift_spot(2, 0, [])


def test_truncated_checkpoint_is_reported_and_skipped(tmp_path):
    dirs, _ = write_fake_run(tmp_path, epochs=(2, 4, 6))
    f = dirs[4] / "group_b.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(IncompleteCheckpointWarning, match=r"epoch_0004.*group_b.safetensors.*truncated"):
        good, bad = verify_checkpoints(dirs.values())
    assert {i.epoch for i in good.values()} == {2, 6}
    assert list(bad) == [dirs[4]]


def test_sweet_spot_on_a_broken_checkpoint_is_a_clear_error(fake_run):
    dirs, _, metas = fake_run
    complete = {e: p for e, p in dirs.items() if e != 4}
    spots = dict.fromkeys((u.name for u in selection_units()), 2)
    spots["group_b"] = 4
    with pytest.raises(
        CheckpointError, match=r"sweet spot of 'group_b' is epoch 4, whose checkpoint is broken: truncated"
    ):
        build_crossover(spots, complete, metas, problems={4: "truncated"})
    with pytest.raises(
        CheckpointError, match=r"no complete checkpoint of that epoch \(available: \[2, 6, 8, 10, 12\]\)"
    ):
        build_crossover(spots, complete, metas)


def test_meta_mismatch_is_refused_with_the_field_named(fake_run):
    dirs, _, metas = fake_run
    bad = copy.deepcopy(metas)
    cfg = config_to_dict(Config())
    cfg["model"]["dropout"] = 0.3
    bad[6] = fake_meta(6, config=cfg)
    with pytest.raises(CrossoverError, match=r"epoch_0006/meta.json: config.model = .*'dropout': 0.3"):
        build_crossover(default_targets(), dirs, bad)
    bad[6] = {**metas[6], "input_dim": 32}
    with pytest.raises(CrossoverError, match="input_dim = 32"):
        check_compatible(bad, dirs)
    bad[6] = {**metas[6], "tasks": {}}
    with pytest.raises(CrossoverError, match="tasks = {}"):
        check_compatible(bad)


def test_missing_key_in_a_group_file_is_refused(tmp_path, fake_run):
    from safetensors.torch import save_file

    dirs, _, metas = fake_run
    # A group file without one of its keys (another model version): never skipped silently.
    import shutil

    broken = tmp_path / "epoch_0002"
    shutil.copytree(dirs[2], broken)
    tensors = load_group(broken, "group_c")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(broken / "group_c.safetensors"))
    spots = dict.fromkeys((u.name for u in selection_units()), 4)
    spots["group_c"] = 2
    with pytest.raises(
        CrossoverError, match=rf"group_c.safetensors: unit 'group_c' has missing keys \['{dropped}'\]"
    ):
        build_crossover(spots, {**dirs, 2: broken}, metas)
    assert set(GROUPS["group_c"]) == {"dsp", "kalman"}


# ----------------------------------------------------------------------------- group soups


def test_a_group_soup_of_one_checkpoint_per_unit_is_the_crossover(fake_run):
    dirs, _, metas = fake_run
    spots = default_targets()
    crossover, _ = build_crossover(spots, dirs, metas)
    soup, sources = build_group_soup(window_members(spots, 0, sorted(dirs)), dirs, metas)
    assert {u: s["epochs"] for u, s in sources.items()} == {u: [e] for u, e in spots.items()}
    expected = crossover.state_dict()
    for k, v in soup.state_dict().items():
        assert torch.equal(v, expected[k]), k  # bit for bit, not only close


def test_a_linked_group_is_averaged_over_its_own_epochs_only(fake_run):
    dirs, base, metas = fake_run
    # Every unit a different window; group A and group B deliberately do not share their epochs.
    members = {u.name: [2, 4, 6] for u in selection_units()}
    members.update(group_a=[2, 4], group_b=[10, 12], group_c=[8], advanced_emotion=[4, 6, 8, 10])
    soup, sources = build_group_soup(members, dirs, metas)
    state = soup.state_dict()
    epochs_of = {e: epoch_state(base, e) for e in dirs}
    for unit in selection_units():
        keys = [k for k in state if param_prefix_owner(k) in unit.modules]
        assert keys and sources[unit.name]["epochs"] == members[unit.name]
        for k in keys:
            mean = torch.stack([epochs_of[e][k] for e in members[unit.name]]).double().mean(0).float()
            torch.testing.assert_close(state[k], mean, rtol=0, atol=1e-7)
    # Every key of a linked group (the backbone and its heads alike) comes from the group's epochs, and
    # from no other group's: the heads are not the average over group B's epochs.
    for k in [k for k in state if param_prefix_owner(k) in GROUPS["group_a"]]:
        other = torch.stack([epochs_of[e][k] for e in members["group_b"]]).mean(0)
        assert not torch.allclose(state[k], other), k
    # A module of a linked group cannot be given epochs of its own.
    with pytest.raises(CrossoverError, match=r"\['heads.emotion'\], which are not selection units"):
        build_group_soup({**members, "heads.emotion": [10]}, dirs, metas)
    with pytest.raises(CrossoverError, match="no epochs for unit 'group_c'"):
        build_group_soup({**members, "group_c": []}, dirs, metas)


def test_window_members_count_checkpoints_and_clamp():
    available = [2, 4, 6, 10, 12]  # epoch 8 is missing (broken): the window counts checkpoints
    spots = {"group_a": 2, "group_b": 6, "phase0": 12}
    assert window_members(spots, 1, available) == {
        "group_a": [2, 4],
        "group_b": [4, 6, 10],
        "phase0": [10, 12],
    }
    assert window_members(spots, 2, available)["group_b"] == [2, 4, 6, 10, 12]
    assert window_members(spots, 0, available) == {u: [e] for u, e in spots.items()}
    with pytest.raises(CrossoverError, match="not a complete checkpoint"):
        window_members({"group_a": 8}, 1, available)
