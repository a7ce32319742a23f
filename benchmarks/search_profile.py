"""Where a float16 search's time goes (issue 27 item 3): conversion, product and top-k bookkeeping apart.

In one process (numpy/BLAS, torch and FAISS on one thread), over an in-RAM float16 matrix of unit-norm rows
(``--matrix-mb`` of float32, half that stored) and the same rows in float32, for each K and number of query
vectors, interleaved and the median of ``--repeats`` runs (ratios are to ``bare32``, the float32 product
of the same rows in blocks, nothing kept):

bare32            float32 rows, one product per 32 MiB block (the floor of a float32 search)
convert_cache     float16 -> float32 (torch, F16C) into one 1 MiB buffer, chunk after chunk, nothing else
convert_block     the same into a 32 MiB block buffer (what the many-vector scan does)
product_cache     the product alone, of a 1 MiB float32 chunk already in cache, as many times as chunks
scan_new          `vector_file.score_codes`: conversion in cache + product per chunk (the new scan's scoring)
topk_new          the bookkeeping alone over precomputed scores: `_TopBoth` per span (few vectors) or
                  `_TopK` helpful + harmful per block (many)
search_new        `vector_index.search_both` over a flat FAISS float16 index of the same rows (all of the above)
faiss_fp16_pass   FAISS's own float16 scalar-quantizer search, one pass (decode fused into the product; the
                  old one-vector path ran two: the query and its negation); one vector only
torch_fp16_mm     torch's float16 product (float16 out: too coarse to rank with; speed only)
amx_bf16_split    exact-enough bf16 splits on AMX through MKL's cblas_gemm_bf16bf16f32 exported by torch's
                  library (rows = hi + lo, queries = hi + mid: 3 products, float32 accumulation), split cost
                  included; many vectors only, skipped where the symbol is absent
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import parse_arguments, write_json  # noqa: E402
from search_topk import SMOKE_MATRIX, interleaved  # noqa: E402

from rapidin_index.store import vector_file, vector_index  # noqa: E402


def mkl_bf16_gemm():
    """MKL's bf16 x bf16 -> float32 GEMM from torch's own library, or None."""
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        gemm = library.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    gemm.restype = None
    gemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    gemm.argtypes += [ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]

    def product(left, right, out):  # out [m, n] = left [m, k] @ right [n, k]^T, all contiguous
        m, k, n = left.shape[0], left.shape[1], right.shape[0]
        gemm(101, 111, 112, m, n, k, 1.0, left.data_ptr(), k, right.data_ptr(), k, 0.0, out.data_ptr(), n)

    return product


def profile(dimension: int, count: int, matrix_mb: int, repeats: int, top_k: int) -> dict:
    rng = np.random.default_rng(0)
    rows = matrix_mb * 10**6 // (4 * dimension)
    single = rng.standard_normal((rows, dimension), dtype=np.float32)
    single /= np.linalg.norm(single, axis=1, keepdims=True)
    half = single.astype(np.float16)
    single = half.astype(np.float32)
    codes = half.view(np.uint8)  # [rows, 2d]: the file's byte form
    queries = rng.standard_normal((count, dimension), dtype=np.float32)
    block = vector_index._block_rows(dimension, count, vector_index.SCAN_BLOCK_BYTES)
    chunk = max(1, vector_file.HALF_CHUNK_BYTES // (4 * dimension))
    source, cache_buffer = torch.from_numpy(half), torch.empty((chunk, dimension))
    block_buffer = torch.empty((block, dimension))
    scores = np.empty((count, rows), np.float32)
    flat = vector_index.new_index(dimension, "float16")
    vector_index.add_vectors(flat, single, np.arange(rows))
    ids = np.arange(rows)

    def bookkeeping():
        if count < vector_index._PRODUCT_QUERIES:
            span = max(1, vector_index.SPAN_BYTES // (4 * count))
            both = vector_index._TopBoth(count, top_k)
            for start in range(0, rows, span):
                both.offer(scores[:, start : start + span], ids[start : start + span])
            return
        best, worst = vector_index._TopK(count, top_k), vector_index._TopK(count, top_k)
        for start in range(0, rows, block):
            keys = scores[:, start : start + block]
            best.offer(keys, ids[start : start + block])
            worst.offer(-keys, ids[start : start + block])

    functions = {
        "bare32": lambda: [queries @ single[s : s + block].T for s in range(0, rows, block)],
        "convert_cache": lambda: [cache_buffer[: len(p)].copy_(p) for p in source.split(chunk)],
        "convert_block": lambda: [block_buffer[: len(p)].copy_(p) for p in source.split(block)],
        "product_cache": lambda: [queries @ single[:chunk].T for _ in range(0, rows, chunk)],
        "scan_new": lambda: vector_file.score_codes(
            codes, "float16", queries, scores, vector_file.HALF_CHUNK_BYTES
        ),
        "topk_new": bookkeeping,
        "search_new": lambda: vector_index.search_both(flat, queries, top_k),
        "torch_fp16_mm": lambda: [torch.from_numpy(queries).half() @ p.T for p in source.split(block)],
    }
    if count == 1:
        sq = faiss.downcast_index(flat.index)
        functions["faiss_fp16_pass"] = lambda: sq.search(queries, top_k)
    bf16 = mkl_bf16_gemm()
    if bf16 is not None and count >= vector_index._PRODUCT_QUERIES:
        query = torch.from_numpy(queries)
        high = query.bfloat16()
        middle = (query - high.float()).bfloat16()
        both_queries = torch.cat([high, middle]).contiguous()  # [2q, d]
        outputs = torch.empty((2 * count, block)), torch.empty((count, block))

        def amx():
            for p in source.split(block):
                converted = block_buffer[: len(p)].copy_(p)
                upper = converted.bfloat16()  # rounded: the rest below is exact in bf16
                lower = (converted - upper.float()).bfloat16()
                bf16(
                    both_queries,
                    upper,
                    outputs[0][:, : len(p)] if len(p) == block else torch.empty(2 * count, len(p)),
                )
                bf16(high, lower, outputs[1][:, : len(p)] if len(p) == block else torch.empty(count, len(p)))

        functions["amx_bf16_split"] = amx
    medians = interleaved(functions, repeats)
    return {"K": dimension, "rows": rows, "queries": count, **medians}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sketch-dims", default="4096,65536")
    parser.add_argument("--matrix-mb", type=int, default=256)
    parser.add_argument("--queries", default="1,100")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parse_arguments(parser, argv, **SMOKE_MATRIX, top_k=3)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    results = []
    for dimension in (int(d) for d in args.sketch_dims.split(",")):
        for count in (int(q) for q in args.queries.split(",")):
            results.append(profile(dimension, count, args.matrix_mb, args.repeats, args.top_k))
            print(json.dumps(results[-1]), flush=True)
    names = [key for key in results[0] if key not in ("K", "rows", "queries")]
    names += [key for e in results for key in e if key not in names and key not in ("K", "rows", "queries")]
    print("\n| K | rows | query vectors | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for e in results:
        cells = [f"{e[n]:.3f} ({e[n] / e['bare32']:.2f})" if n in e else "-" for n in names]
        print(f"| {e['K']:,} | {e['rows']:,} | {e['queries']} | " + " | ".join(cells) + " |")
    write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
