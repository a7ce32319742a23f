"""Issue 23 research: EK-FAC whose eigenbasis comes from token-level K-FAC factors, sketched into rapidgrad-kron bins.

For a linear layer W [out, in] the per-example gradient is ``G = sum_t d_t a_t^T``; K-FAC's weight-space
Fisher is ``S (x) A`` with ``S = E_t[d d^T]`` (output gradients, labels sampled from the model: the true
Fisher) and ``A = E_t[a a^T]`` (inputs), over every token. rapidgrad-kron's piece k sketches ``C1 G C2^T``,
so the sketched Fisher is ``(C1 S C1^T) (x) (C2 A C2^T)``: the piece's two factors, from the model. The
eigenvalues in that basis are refitted from the stored rows (EK-FAC). The embedding, the norm weights and
bins no tensor covers keep the empirical Fisher (`precondition.fit_fisher`). Analysis only (`lds_kfac.py`
holds the table's other rows); needs `lds.py`'s cache.

    .venv/bin/python benchmarks/lds_token_kfac.py --folder .bench/lds
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import parse_arguments as parse_with_smoke
from lds import index_folder, linear_datamodeling_score, smoke_cache, stored_pair, summarize
from lds_kfac import losses_and_masks, query_norms, redamp

from rapidin_index import SketchSettings
from rapidin_index.data import IGNORE_INDEX, Template
from rapidin_index.demo.finetune import tokenize_rows
from rapidin_index.kfac import KroneckerBlock
from rapidin_index.precondition import Preconditioner, fit_fisher, spans_for
from rapidin_index.sketch.kron import COL_SIDE, ROW_SIDE, kron_layout, side_hash
from rapidin_index.store.manifest import read_manifest


def token_factors(model_dir: Path, rows: list[dict], names: list[str], sample: bool, seed: int = 0) -> dict:
    """{parameter name: (S [out, out], A [in, in])} over every token of ``rows`` (float64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in names}
    sums = {name: [0.0, 0.0] for name in names}
    count = [0]
    inputs: dict[str, torch.Tensor] = {}

    def forward_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            output.register_hook(lambda grad: record(name, grad))

        return hook

    def record(name, grad):
        a = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
        d = grad.reshape(-1, grad.shape[-1]).double()
        sums[name][0] += d.T @ d
        sums[name][1] += a.T @ a

    handles = [module.register_forward_hook(forward_hook(name)) for name, module in modules.items()]
    generator = torch.Generator().manual_seed(seed)
    for ids, labels in tokenize_rows(rows, tokenizer, Template("alpaca"), 128):
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids).logits[0, :-1].float()  # [tokens - 1, vocab]
        target = torch.tensor(labels[1:])
        mask = target != IGNORE_INDEX
        if sample:
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            target = torch.where(mask, sampled, target)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / mask.sum()
        loss.backward()
        count[0] += len(ids)
    for handle in handles:
        handle.remove()
    return {name: (s.numpy() / count[0], a.numpy() / count[0]) for name, (s, a) in sums.items()}


def count_matrix(seed: int, offset: int, side: int, piece: int, size: int, bins: int) -> np.ndarray:
    """[bins, size] signed 0/1 count sketch of one side of one piece (scale left out: it cancels)."""
    hashed, signs = side_hash(seed, offset, side, piece, size, bins)
    matrix = np.zeros((bins, size))
    matrix[hashed.numpy(), np.arange(size)] = signs.numpy()
    return matrix


def token_blocks(manifest, factors: dict, train: np.ndarray, corrected: bool) -> dict[int, KroneckerBlock]:
    """{segment start: KroneckerBlock} of the linear layers, damping 1 x mean eigenvalue (re-damped later)."""
    names, shapes = manifest.parameters["names"], [tuple(s) for s in manifest.parameters["shapes"]]
    sizes = [math.prod(shape) for shape in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    sketch_dim = manifest.sketch["output_dim"]  # 65536 (a smoke run's: lds.SMOKE_SKETCH)
    segments = kron_layout(
        list(zip(offsets, shapes, strict=True)), manifest.sketch["gradient_dim"], sketch_dim
    )
    by_offset = {segment.offset: segment for segment in segments}
    seed, out = manifest.sketch["seed"], {}
    for name, offset in zip(names, offsets, strict=True):
        if name not in factors:
            continue
        segment, (s_factor, a_factor) = by_offset[offset], factors[name]
        lefts, rights, values = [], [], []
        part = train[:, segment.start : segment.start + segment.width].astype(np.float64)
        matrices = part.reshape(len(train), segment.pieces, segment.row_bins, segment.col_bins)
        for piece in range(segment.pieces):
            c1 = count_matrix(seed, offset, ROW_SIDE, piece, segment.rows, segment.row_bins)
            c2 = count_matrix(seed, offset, COL_SIDE, piece, segment.cols, segment.col_bins)
            left_values, left = np.linalg.eigh(c1 @ s_factor @ c1.T)
            right_values, right = np.linalg.eigh(c2 @ a_factor @ c2.T)
            rotated = np.einsum("ia,nij,jb->nab", left, matrices[:, piece], right)
            if corrected:
                values.append(np.square(rotated).mean(axis=0))
            else:  # K-FAC: the products, scaled to the rows' trace
                products = np.outer(np.clip(left_values, 0, None), np.clip(right_values, 0, None))
                values.append(products * np.square(rotated).mean(axis=0).sum() / max(products.sum(), 1e-300))
            lefts.append(left)
            rights.append(right)
        mean = float(np.square(part).sum()) / len(train) / segment.width
        out[segment.start] = KroneckerBlock(
            segment.start,
            segment.start + segment.width,
            np.stack(lefts).astype(np.float32),
            np.stack(rights).astype(np.float32),
            np.stack(values),
            mean if mean > 0 else 1.0,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds")
    parser.add_argument("--dampings", default="0.01,0.03,0.1,0.3,1")
    parser.add_argument("--out", default=".bench/lds-token-kfac.json")
    # the smoke run: lds.py's smoke cache (made here, lds.smoke_cache), one damping
    arguments = parse_with_smoke(parser, folder="{smoke}/lds", dampings="0.1", out="{smoke}/result.json")
    torch.set_num_threads(1)
    folder = Path(arguments.folder)
    if arguments.smoke and not (folder / "settings.json").exists():
        smoke_cache(folder)
    masks, losses, count = losses_and_masks(folder)
    sketch = SketchSettings(65536)
    pair = stored_pair(folder, sketch, "layer", False)  # made if missing
    manifest = read_manifest(index_folder(folder, sketch, "layer", False, "train"))
    train, queries = pair["train"].astype(np.float32), pair["queries"].astype(np.float64)
    scaled = queries * query_norms(folder, False, manifest, 65536)
    rows = [json.loads(line) for line in open(folder / "train.jsonl")]
    linear = [n for n, s in zip(manifest.parameters["names"], manifest.parameters["shapes"], strict=True)]
    linear = [
        n
        for n, s in zip(linear, manifest.parameters["shapes"], strict=True)
        if len(s) == 2 and "embed" not in n
    ]
    fisher = fit_fisher(train, spans_for(manifest, "auto")[1], 1.0)
    out = {}
    for sample in (True, False):
        factors = token_factors(folder / "full", rows, linear, sample)
        for corrected in (True, False):
            replaced = token_blocks(manifest, factors, train, corrected)
            for damping in [float(d) for d in arguments.dampings.split(",")]:
                for fisher_damping in (0.5,):
                    blocks = [
                        redamp([replaced[b.start]], damping)[0]
                        if b.start in replaced
                        else redamp([b], fisher_damping)[0]
                        for b in fisher
                    ]
                    for side, vectors in (("query", queries), ("query-norms", scaled)):
                        scores = Preconditioner(blocks, {}).apply(vectors).astype(
                            np.float64
                        ) @ train.T.astype(np.float64)
                        result = summarize(linear_datamodeling_score(scores, masks, losses), count)
                        name = (
                            f"{'ek' if corrected else ''}fac token factors ({'true' if sample else 'empirical'} "
                            f"Fisher), damping {damping} ({side})"
                        )
                        out[name] = {key: result[key] for key in ("lds", "lds_triggered", "lds_clean")}
                        print(f"{name}: {out[name]['lds']:.3f}", flush=True)
    Path(arguments.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
