"""RapidGrad: compress a layer-normalised gradient of length D to a sketch of length K.

Both transforms are a signed permutation of the gradient, zero-padded to ``padded_dim`` (the next multiple
of K), followed by sums over K equal bins of ``padded_dim / K`` consecutive positions: a count sketch in
which every bin receives exactly ``padded_dim / K`` coordinates, so ``<sketch(x), sketch(y)>`` is an
unbiased estimate of ``<x, y>``. The sign of a coordinate is a counter-based hash of (seed, its final
position), so no sign vector is stored. They differ in the permutation (the manifest names the one used):

* ``rapidgrad-v2`` (a build's "auto" picks it except for full-parameter models at K >= 65536 or above
  2^24 parameters) is a keyed pseudo-random permutation of the whole of [0, padded_dim): an
  unbalanced Feistel network on the smallest enclosing power of two, ``FEISTEL_ROUNDS`` rounds whose round
  function is murmur3's finaliser keyed by (seed, round), with cycle-walking back into [0, padded_dim). It
  is fixed by (seed, D, K); its whole state is the round keys, so a worker keeps O(1) memory at any D.
* ``rapidgrad-v1`` is the paper's transform (SPEC 2.3, after Lin et al. 2024), fixed by (seed, D, K,
  lambda): ``lambda`` random shuffles, each a row permutation of a ``[r, padded_dim / r]`` reshape followed
  by a column permutation of a ``[padded_dim / c, c]`` reshape, r and c random divisors of ``padded_dim``
  (a product of a random subset of its prime factors, as in the reference code, capped at 2^18 so that no
  permutation is large). It mixes poorly at 7B scale (benchmarks/sketch_mixing.py: adjacent coordinates
  often share a bin); it is kept, bit for bit, so that indexes built with it keep opening.
* ``rapidgrad-ts`` (:class:`RapidGradTSProjector`, `sketch.ts`; the math on factors is :mod:`rapidin_index.factors`)
  hashes each 2-D parameter tensor with a tensor-product
  count sketch, bin (h1(i) + h2(j)) mod K and sign s1(i) s2(j), so that a linear layer's per-example
  gradient (a sum of outer products) is sketched from its factors by FFT, never materialised; every other
  coordinate is hashed as rapidgrad-v2 hashes it. Its bins are not equal-sized (a plain count sketch).
* ``rapidgrad-kron`` (:class:`RapidGradKronProjector`, `sketch.kron`) gives every
  parameter tensor bins of its own and sketches a weight matrix there as independent Kronecker count
  sketches of its factors: two small matmuls per token, no scatter. 'auto' picks it over rapidgrad-ts
  where K holds 2,048 bins a weight matrix.

Two implementations of each exist:

* :func:`reference_sketch` (`sketch.reference`) does the transform literally, with an explicit permutation and sign
  vector (O(D) memory). It is slow and obviously correct; tests compare the fast paths against it.
* the projectors (`sketch.v2.RapidGradV2Projector`, `sketch.v1.RapidGradV1Projector`,
  `sketch.ts.RapidGradTSProjector`, `sketch.kron.RapidGradKronProjector`, `sketch.exact.ExactProjector` for
  K = 0; :func:`make_projector` in `sketch.projectors` picks one and names the contract, `Projector`) map each source coordinate to its
  bin and sign on the fly, with vectorised integer ops on whole coordinate ranges (v1's shuffle plan is
  ``2 * lambda`` small permutations of about sqrt(D) entries). Gradient blocks are projected one parameter
  tensor at a time, at their offset in the flattened gradient, without ever concatenating them.
"""

from rapidin_index.sketch.projectors import FactorProjector, Projector, make_projector
from rapidin_index.sketch.reference import reference_sketch

__all__ = ["FactorProjector", "Projector", "make_projector", "reference_sketch"]
