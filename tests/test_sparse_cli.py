"""`prunekit export DIR --format sparse` and `prunekit generate DIR2 --offload` on a tiny pruned model: the
compressed folder loads through `prunekit.load` with the same weights, and offloaded generation (one block
decompressed at a time) prints the same text as the dense export."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import saved_tensors

from prunekit.cli import main


def test_export_sparse_loads_with_prunekit_and_generates_the_same_offloaded(tiny_model_dir, tmp_path, capsys):
    from prunekit.io.loading import load
    pruned, sparse = tmp_path / "pruned", tmp_path / "sparse"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.6", "--samples", "4",
                 "--seqlen", "16", "--no-eval", "--out", str(pruned)]) == 0
    assert main(["export", str(pruned), "--format", "sparse", "--out", str(sparse)]) == 0
    assert "weights compressed" in capsys.readouterr().out
    dense, _ = load(pruned)
    packed, _ = load(sparse)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, packed.state_dict()[name]), name
    assert sum(p.stat().st_size for p in sparse.glob("*.safetensors")) < 0.7 * sum(
        p.stat().st_size for p in pruned.glob("*.safetensors"))
    assert saved_tensors(pruned)                        # the source is untouched
    texts = []
    for model, extra in ((pruned, []), (sparse, ["--offload"])):
        assert main(["generate", str(model), "--prompt", "the model is", "--max-new-tokens", "8", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert main(["generate", str(pruned), "--prompt", "x", "--offload"]) == 2
    assert "is not one" in capsys.readouterr().err
    assert main(["export", str(pruned), "--format", "sparse", "--out", str(sparse)]) == 2
    assert "--overwrite" in capsys.readouterr().err
