"""AQLM: additive multi-codebook quantization (Egiazarian et al. 2024, https://arxiv.org/abs/2401.06118).

A weight W (O, I) is cut into J = I / g groups of g consecutive inputs. Group j of row o is a sum of M codewords,
one from each codebook C_m of K = 2^B vectors of length g, times a scale per row:

    Ŵ[o, j·g:(j+1)·g] = s[o] · Σ_m C_m[b[o, j, m]]

and everything is chosen to minimise the calibration objective L = tr((W − Ŵ) H (W − Ŵ)ᵀ) (Algorithm 1):
    1. s = row norms; codes and codebooks by residual k-means on the scaled groups, each point weighted by its
       inputs' Hessian diagonal;
    2. rounds of: codebooks and scales by Adam with codes fixed; codes by beam search with codebooks and scales
       fixed; until L improves by less than `relative_tolerance` or `max_rounds` is reached.
"""

import math
from dataclasses import dataclass

import torch

from lqtk.errors import LqtkError
from lqtk.formats import AQLMFormat, QuantizedWeight
from lqtk.formats.aqlm import decode, propose
from lqtk.formats.packing import pack_bits
from lqtk.quant.base import WeightQuantizer


@dataclass
class AQLM(WeightQuantizer):
    """Additive quantization with learned codebooks, beam-searched codes and per-row scales."""

    format = AQLMFormat.name

    num_codebooks: int = 2
    """M: codewords summed per group (bits per weight ≈ M·B / g, plus codebooks and scales)."""
    nbits_per_codebook: int = 8
    """B: each codebook has 2^B codewords (8: one byte per code; 16 is the paper's 1x16)."""
    in_group_size: int = 8
    """g: consecutive inputs encoded together; must divide the layer's input dim."""
    beam_size: int = 4
    """Code states kept per group while its M codes are re-chosen one codebook at a time (the paper: 1 to 8)."""
    max_rounds: int = 20
    """Upper bound on (Adam, beam search) rounds."""
    relative_tolerance: float = 0.01
    """Stop when a round lowers the objective by less than this fraction."""
    adam_steps: int = 20
    """Adam steps on codebooks and scales per round (the authors' code: 100 at lr 1e-4; fewer, larger steps
    reach the same objective sooner: after the first rounds the code updates gain far more than Adam)."""
    lr: float = 1e-3
    """Adam learning rate."""
    phases: int = 8
    """Beam search re-codes the groups in this many interleaved sets, one set after another, all groups of a set
    at once (1: all groups at once, fastest but changes conflict; J: one group at a time)."""
    code_sweeps: int = 2
    """Beam-search passes over all groups per round."""
    kmeans_iters: int = 30
    """Lloyd iterations of each codebook's k-means initialisation."""
    seed: int = 0
    """Seed of the k-means initialisation (every layer starts from the same seed: results do not depend on order)."""

    def __post_init__(self):
        if self.num_codebooks < 1 or not 1 <= self.nbits_per_codebook <= 16 or self.in_group_size < 1:
            raise LqtkError(f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} g{self.in_group_size}: needs "
                            "num_codebooks >= 1, 1 <= nbits_per_codebook <= 16 and in_group_size >= 1 (e.g. 2x8 g8)")

    def check_fits(self, shape: tuple[int, int]) -> None:
        """Refuse settings that cannot encode an (O, I) layer, proposing one that can."""
        (out_features, in_features), g = shape, self.in_group_size
        if in_features % g:
            fits = [d for d in (4, 8, 16, 32) if in_features % d == 0]
            raise LqtkError(f"AQLM in_group_size={g} does not divide the input dim {in_features} of a "
                            f"{out_features}x{in_features} layer: choose one of {fits or [1]}")
        codebook_entries = self.num_codebooks * 2**self.nbits_per_codebook * g
        if codebook_entries > out_features * in_features:
            bits = int(math.log2(out_features * in_features / (self.num_codebooks * g)))
            raise LqtkError(f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} g{g}: its codebooks "
                            f"({codebook_entries} values) are larger than the {out_features}x{in_features} layer "
                            f"they encode; use nbits_per_codebook <= {bits}, or keep this layer out (`skip`)")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, progress=None) -> QuantizedWeight:
        if hessian is None:
            raise ValueError("AQLM needs the calibration Hessian of the layer's inputs")
        self.check_fits(tuple(weight.shape))
        codes, codebooks, scales, history = aqlm_quantize(weight, hessian, self, progress or (lambda _: None))
        (out_features, _), groups = weight.shape, weight.shape[1] // self.in_group_size
        spec = {"num_codebooks": self.num_codebooks, "nbits_per_codebook": self.nbits_per_codebook,
                "in_group_size": self.in_group_size, "shape": list(weight.shape)}
        tensors = {"codes": pack_bits(codes.view(out_features, groups * self.num_codebooks), self.nbits_per_codebook),
                   "codebooks": codebooks.half(), "scales": scales.half()}
        return QuantizedWeight("aqlm", AQLMFormat.name, spec, tensors, history={"objective": history})


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: AQLM, progress):
    """Algorithm 1. Returns codes (O, J, M), codebooks (M, K, g), scales (O, 1) and the relative objective
    L / tr(W H Wᵀ) after initialisation and after every round. Codebooks and scales are kept on the fp16 grid they
    are stored in, so the objective is that of the export."""
    W, H = weight.float().clone(), hessian.float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: any value is exact, make them 0
    H[dead, dead] = 1
    W[:, dead] = 0
    norm = (W @ H * W).sum()

    def objective(codes, codebooks, scales) -> float:
        return (proxy_loss(W, H, decode(codes, codebooks, scales)) / norm).item()

    scales = W.norm(dim=1, keepdim=True).clamp(min=1e-8).half().float()
    codes, codebooks = init_residual_kmeans(W / scales, H.diagonal(), config)
    history = [objective(codes, codebooks, scales)]
    progress(f"k-means init, objective {history[-1]:.3e}")
    for round_ in range(1, config.max_rounds + 1):
        trained_codebooks, trained_scales = train_codebooks(W, H, codes, codebooks, scales, config)
        trained = objective(codes, trained_codebooks, trained_scales)
        if not math.isfinite(trained):
            raise LqtkError(f"AQLM: the objective became {trained} during Adam (round {round_}): lower `lr`")
        if trained < history[-1]:  # Adam on the fp16 grid may overshoot near the optimum: keep what is better
            codebooks, scales = trained_codebooks, trained_scales
        for _ in range(config.code_sweeps):
            codes = update_codes(W, H, codes, codebooks, scales, config)
        history.append(objective(codes, codebooks, scales))
        progress(f"round {round_}, objective {history[-1]:.3e}")
        if history[-2] - history[-1] < config.relative_tolerance * history[-2]:
            break
    return codes, codebooks, scales, history


def proxy_loss(W: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor) -> torch.Tensor:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = ||(W − Ŵ) X||² for H = XᵀX."""
    delta = W - W_hat
    return (delta @ H * delta).sum()


# --- initialisation ---------------------------------------------------------------------------------------------
def init_residual_kmeans(W: torch.Tensor, importance: torch.Tensor, config: AQLM):
    """Codebook m is a k-means of what codebooks 1..m-1 left of the groups of W (O, I). Each group is a point of
    g dims whose coordinates are weighted by their inputs' diag(H), so clusters are tight where the inputs are."""
    out_features, in_features = W.shape
    g, K = config.in_group_size, 2**config.nbits_per_codebook
    points = W.view(-1, g)  # (O·J, g), row-major: point p is group p % J of row p // J
    weights = importance.view(1, -1, g).expand(out_features, -1, -1).reshape(-1, g)
    generator = torch.Generator().manual_seed(config.seed)
    residual, codes, codebooks = points.clone(), [], []
    for _ in range(config.num_codebooks):
        centroids, assignment = weighted_kmeans(residual, weights, K, config.kmeans_iters, generator)
        residual -= centroids[assignment]
        codes.append(assignment)
        codebooks.append(centroids)
    return torch.stack(codes, 1).view(out_features, in_features // g, -1), torch.stack(codebooks).half().float()


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, K: int, iters: int, generator: torch.Generator,
                    points_per_centroid: int = 64):
    """Lloyd's algorithm for Σ_p Σ_d weights[p, d] (points[p, d] − c[a(p), d])². Returns centroids (K, g) and the
    assignment (P,) of all points. The iterations see a random sample of `points_per_centroid`·K points (as faiss
    does: more barely moves the centroids), seeded by k-means++; an empty cluster keeps its centroid."""
    sample = torch.randperm(len(points), generator=generator)[: points_per_centroid * K].to(points.device)
    x, w = points[sample], weights[sample]
    centroids = kmeans_plus_plus(x, w, K, generator)
    for _ in range(iters):
        assignment = nearest(x, w, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x * w)
        mass = torch.zeros_like(centroids).index_add_(0, assignment, w)
        centroids = torch.where(mass > 0, sums / mass.clamp(min=1e-30), centroids)
    return centroids, nearest(points, weights, centroids)


def kmeans_plus_plus(x: torch.Tensor, w: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """K seeds drawn one at a time with probability ∝ the weighted squared distance to the nearest seed so far
    (Arthur & Vassilvitskii 2007): spread-out seeds, and never a point that is already a seed."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    distance = ((x - x[chosen[0]]).square() * w).sum(1)
    for _ in range(1, K):
        if distance.sum() <= 0:  # fewer distinct points than K: repeat one (its cluster stays empty)
            chosen.append(chosen[-1])
            continue
        chosen.append(int(torch.multinomial(distance.cpu().double(), 1, generator=generator)))
        distance = torch.minimum(distance, ((x - x[chosen[-1]]).square() * w).sum(1))
    return x[chosen].clone()


def nearest(points, weights, centroids, chunk: int = 65536):
    """argmin_k Σ_d w_d (x_d − c_kd)² = argmin_k (w ⊙ c_k)·c_k − 2 (w ⊙ x)·c_k, in chunks of points."""
    out = []
    for x, w in zip(points.split(chunk), weights.split(chunk)):
        out.append((w @ centroids.square().T - 2 * (w * x) @ centroids.T).argmin(1))
    return torch.cat(out)


# --- codebooks and scales: Adam with codes fixed ----------------------------------------------------------------
@torch.enable_grad()  # callers (calibration phases) run under no_grad
def train_codebooks(W, H, codes, codebooks, scales, config: AQLM):
    """`adam_steps` Adam steps on L over codebooks and scales. L's gradient with respect to Ŵ is 2 (Ŵ − W) H: one
    matmul per step, pushed through the decode by autograd (which would otherwise take two)."""
    codebooks = codebooks.clone().requires_grad_()
    scales = scales.clone().requires_grad_()
    optimizer = torch.optim.Adam([codebooks, scales], lr=config.lr)
    for _ in range(config.adam_steps):
        W_hat = decode(codes, codebooks, scales)
        optimizer.zero_grad(set_to_none=True)
        W_hat.backward(2 * (W_hat.detach() - W) @ H)
        optimizer.step()
    return codebooks.detach().half().float(), scales.detach().half().float()


# --- codes: beam search with codebooks and scales fixed --------------------------------------------------------
def update_codes(W, H, codes, codebooks, scales, config: AQLM):
    """One pass of beam search over every group's codes, all rows at once.

    Changing group j of row o by δ (g,) changes L by  ΔL = δᵀ H_jj δ − 2 δ·G_oj  with G = (W − Ŵ) H: a unary term
    per group plus its coupling to all other groups through G (the pairwise, MRF form). The groups are taken in
    `phases` interleaved sets, one set after another; inside a set every group's M codes are re-chosen in parallel
    with G fixed (`propose`). Changes made together interact through H's off-diagonal blocks, so each row keeps the
    best prefix of its changed groups (`accept_best_prefix`), which never raises L; then G is brought up to date."""
    out_features, groups, _ = codes.shape
    g = codebooks.shape[2]
    codes = codes.clone()
    G = (W - decode(codes, codebooks, scales)) @ H
    for phase in range(min(config.phases, groups)):
        chosen = torch.arange(phase, groups, config.phases, device=W.device)  # groups of this set
        columns = (chosen[:, None] * g + torch.arange(g, device=W.device)).flatten()
        H_set = H[columns][:, columns]
        G_set = G[:, columns].view(out_features, len(chosen), g)
        new_codes, delta = propose(G_set, _blocks(H_set, len(chosen), g), codes[:, chosen], codebooks, scales,
                                   config.beam_size)
        take = accept_best_prefix(delta, G_set, H_set)  # (O, J_set) bool
        codes[:, chosen] = torch.where(take[..., None], new_codes, codes[:, chosen])
        G -= (delta * take[..., None]).flatten(1) @ H[columns]
    return codes


def accept_best_prefix(delta, G, H):
    """Which changed groups each row applies: ordered by their own gain, the prefix of J, J/2, ..., 1 groups whose
    exact ΔL = δ H δᵀ − 2 δ·G over the row (δ the row's combined change) is lowest. One group alone has an exact
    ΔL <= 0, so L never rises. delta, G (O, J, g), H (J·g, J·g). Returns (O, J) bool."""
    out_features, groups, g = delta.shape
    gain = 2 * (delta * G).sum(-1) - torch.einsum("ojd,jde,oje->oj", delta, _blocks(H, groups, g), delta)
    rank = gain.argsort(1, descending=True).argsort(1)  # 0 for the group with the largest gain
    best, best_length = delta.new_zeros(out_features), delta.new_zeros(out_features, dtype=torch.long)
    length = groups
    while length >= 1:
        D = (delta * (rank < length)[..., None]).flatten(1)
        change = (D @ H * D).sum(1) - 2 * (D * G.flatten(1)).sum(1)
        better = change < best
        best, best_length = torch.where(better, change, best), torch.where(better, length, best_length)
        length //= 2
    return rank < best_length[:, None]


def _blocks(H: torch.Tensor, groups: int, g: int) -> torch.Tensor:
    """The diagonal (g, g) blocks H_jj of H (J·g, J·g): (J, g, g)."""
    return H.view(groups, g, groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
