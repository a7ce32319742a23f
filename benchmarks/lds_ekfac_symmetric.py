"""Issue 23 analysis: weight-space EK-FAC split across both sides, H^-1/2 on the rows and on the query.

On `lds.py`'s cached models (run it first), the EK-FAC factors of `lds_ekfac_weights_exact.exact_setting`
(every nn.Linear weight Kronecker, the head included; ``--labels``), each damping of ``--dampings``, and
each training row's exact plain gradient g_i, the LDS of:

* exact asymmetric: ``<H^-1 g_q, g_i>`` (kronfluence's score); exact symmetric: ``<H^-1/2 g_q, H^-1/2
  g_i>`` (the same number); the same with the rows' H^-1/2 g_i layer-normalised per tensor;
* the symmetric pair sketched by rapidgrad-kron at each K of ``--sketch-dims`` and by the index's own
  projector (with and without the rows' layer norm), and the asymmetric pair (H^-1 on the query, plain
  rows) sketched the same way;

and kronfluence's scores when ``--folder``/ekfac_scores.npy is there. BENCHMARKS.md, "Issue 23: exact
vectors and the head's curvature".

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lds_ekfac_symmetric.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import parse_arguments
from lds_ekfac_weights import lds
from lds_ekfac_weights_exact import exact_setting

from rapidin_index import SketchSettings, ekfac, ekfac_fit
from rapidin_index.sketch.projectors import make_projector


def power(factors, gradients, exponent):
    out = gradients.to(torch.float32).clone()
    for f in factors:
        span = slice(f.offset, f.offset + f.numel)
        if not f.kronecker:
            out[:, span] = 0
            continue
        values = (torch.from_numpy(f.eigenvalues) + f.damping) ** exponent
        o, i = f.eigenvalues.shape
        bo, bi = torch.from_numpy(f.basis_out), torch.from_numpy(f.basis_in)
        rotated = bo.T @ out[:, span].reshape(-1, o, i) @ bi
        out[:, span] = (bo @ (rotated * values) @ bi.T).reshape(len(out), -1)
    return out


def layer_norm(factors, vectors):
    out = vectors.clone()
    for f in factors:
        if f.kronecker:
            part = out[:, f.offset : f.offset + f.numel]
            part /= part.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=".bench/lds")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--dampings", default="0.01,0.1,1,3")
    parser.add_argument("--sketch-dims", default="4096,16384,65536")
    parser.add_argument("--labels", default="sampled")
    parser.add_argument("--out", default=".bench/lds-ekfac-symmetric.json")
    arguments = parse_arguments(
        parser, folder="{smoke}/lds", dampings="0.1", sketch_dims="4096", out="{smoke}/result.json"
    )
    started = time.perf_counter()
    setting = exact_setting(arguments, arguments.labels)
    print(f"setting and fit {time.perf_counter() - started:.0f} s", flush=True)
    masks, losses, triggered = setting.masks, setting.losses, setting.triggered
    index, gradients, factors = setting.index, setting.gradients, setting.factors
    folder = Path(arguments.folder)
    dampings = [float(d) for d in arguments.dampings.split(",")]
    dims = [int(k) for k in arguments.sketch_dims.split(",")]
    D = index.manifest.sketch["gradient_dim"]
    projectors = {
        k: make_projector(SketchSettings(k, algorithm="rapidgrad-kron"), D, "cpu", index.blocks) for k in dims
    }
    projectors["index"] = index.sketcher.projector
    damped = {d: [dataclasses.replace(f, damping=f.damping * d) for f in factors] for d in dampings}
    variants = {}  # name -> (query [n, *], rows list)

    def add(name, query, rows):
        variants.setdefault(name, [query, []])[1].append(rows)

    batches, _ = ekfac_fit.training_batches(index)
    sketcher = ekfac.exact_sketcher(index)
    lin = [f for f in factors if f.kronecker]
    qhalf = {d: power(damped[d], gradients, -0.5) for d in dampings}
    qfull = {d: power(damped[d], gradients, -1.0) for d in dampings}
    for number, batch in enumerate(batches):
        raw = sketcher.sketch(batch).vectors
        for d in dampings:
            half = power(damped[d], raw, -0.5)
            add(f"exact asymmetric raw, d={d}", qfull[d], (qfull[d] @ raw.T).numpy())
            add(f"exact symmetric, d={d}", qhalf[d], (qhalf[d] @ half.T).numpy())
            hl = layer_norm(lin, half)
            add(f"exact symmetric, rows LN after, d={d}", qhalf[d], (qhalf[d] @ hl.T).numpy())
            for k, projector in projectors.items():
                ps = ekfac.project(projector, half, factors)
                pq = ekfac.project(projector, qhalf[d], factors)
                add(f"sketch {k} symmetric, d={d}", pq, (pq @ ps.T).numpy())
                ph = ekfac.project(projector, hl, factors)
                add(f"sketch {k} symmetric rows LN after, d={d}", pq, (pq @ ph.T).numpy())
                pr = ekfac.project(projector, raw, factors)
                pf = ekfac.project(projector, qfull[d], factors)
                add(f"sketch {k} asymmetric raw rows, d={d}", pf, (pf @ pr.T).numpy())
        print(f"batch {number + 1}/{len(batches)}", flush=True)
    results = {}
    for name, (_, parts) in variants.items():
        results[name] = lds(np.concatenate(parts, axis=1), masks, losses, triggered)
    kron = folder / "ekfac_scores.npy"
    if kron.exists() and not arguments.smoke:
        scores = np.load(kron)[setting.chosen]
        results["kronfluence"] = lds(scores, masks, losses, triggered)
    index.lease.close()
    Path(arguments.out).write_text(json.dumps(results, indent=2))
    for name, result in results.items():
        print(f"| {name} | {result['lds']:.3f} |")


if __name__ == "__main__":
    main()
