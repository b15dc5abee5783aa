"""test.py without --run_dir: the folder train.py names, else the run whose run.json has the order (a
resumed run keeps its first name), several of them refused by name; and the backbone weights of a run
folder come from its run.json unless --ckpt or --random_weights is given."""
import json

import pytest

from samcl import opening
from samcl.cli import CLIError
from samcl.commands.test import default_test_folder
from samcl.config import build_config


def config(**settings):
    return build_config([("test", {"order": "a_b_c", "unseen": [], **settings})])


def fake_run(folder, order, **settings):
    """A run folder as far as finding it goes: run.json's order and configuration."""
    folder.mkdir(parents=True)
    cfg = config(order="_".join(order), **settings)
    (folder / "run.json").write_text(json.dumps({"format": "samcl-run", "order": order, "config": cfg.to_dict()}))
    return folder


def test_the_folder_train_py_names_comes_first(tmp_path):
    cfg = config(output_dir=str(tmp_path))
    named = fake_run(tmp_path / cfg.run_name(), ["a", "b", "c"])
    fake_run(tmp_path / "SAMCL_a_b_300_1234_training", ["a", "b", "c"])
    assert default_test_folder(cfg, "sam") == named


def test_a_resumed_run_is_found_by_the_order_in_its_run_json(tmp_path, capsys):
    cfg = config(output_dir=str(tmp_path))
    resumed = fake_run(tmp_path / "SAMCL_a_b_300_1234_training", ["a", "b", "c"])
    fake_run(tmp_path / "SAMCL_a_b_c_d_300_1234_training", ["a", "b", "c", "d"])  # another order
    fake_run(tmp_path / "finetune-lora_a_b_300_1234_training", ["a", "b", "c"], method="finetune",
             learning_module="lora")  # another method
    fake_run(tmp_path / "SAMCL_a_300_7_training", ["a", "b", "c"], seed=7)  # another seed
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    assert default_test_folder(cfg, "sam") == resumed
    assert capsys.readouterr().out == (f"no run folder {tmp_path}/SAMCL_a_b_c_300_1234_training: testing {resumed}, "
                                       f"whose run.json has the order a_b_c\n")
    assert default_test_folder(config(output_dir=str(tmp_path), seed=7), "sam") == tmp_path / "SAMCL_a_300_7_training"


def test_several_runs_of_the_order_are_named_and_run_dir_asked_for(tmp_path):
    cfg = config(output_dir=str(tmp_path))
    one = fake_run(tmp_path / "SAMCL_a_300_1234_training", ["a", "b", "c"])
    two = fake_run(tmp_path / "SAMCL_a_b_300_1234_training", ["a", "b", "c"], lr=0.1)
    with pytest.raises(CLIError) as e:
        default_test_folder(cfg, "sam")
    assert str(e.value) == (f"error: no run folder {tmp_path}/SAMCL_a_b_c_300_1234_training, and 2 run folders in "
                            f"{tmp_path} have the order a_b_c and these flags' method, module, num_embedding and seed: {one}, "
                            f"{two}; pass the one to test with --run_dir")


def test_no_run_of_the_order_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("samcl.config.CHECKPOINT_DIR", tmp_path / "checkpoint")
    with pytest.raises(CLIError, match=f"nothing to test: looked for the run folder {tmp_path}/SAMCL_a_b_c_300_1234_"
                                       f"training .*, for a run folder in {tmp_path} whose run.json has the order "
                                       f"a_b_c and these flags' method, module, num_embedding and seed \\(none\\)"):
        default_test_folder(config(output_dir=str(tmp_path)), "sam")


@pytest.mark.parametrize("given, passed", [
    ({}, (None, None)),  # neither: the run's own (run.json)
    ({"random_weights": True}, (None, True)),
    ({"ckpt": "other.pth"}, ("other.pth", False)),
])
def test_test_py_opens_a_run_with_its_own_weights_unless_some_are_given(given, passed, monkeypatch):
    seen = {}
    monkeypatch.setattr(opening, "open_run", lambda run_dir, device, **kw: seen.update(kw))
    opening.open_with("run", config(**given), "cpu")
    assert (seen["ckpt"], seen["random_weights"]) == passed
