"""The `aqlm` storage format: additive multi-codebook codes (Egiazarian et al. 2024, https://arxiv.org/abs/2401.06118),
and the beam search over a group's codes that both its producer (`lqtk.quant.AQLM`) and PV-tuning's code step use."""

import math

import torch
import torch.nn.functional as F

from lqtk.formats.base import WeightFormat, largest_gains, register_format
from lqtk.formats.packing import pack_bits, unpack_bits


@register_format
class AQLMFormat(WeightFormat):
    """Ŵ[o, j·g:(j+1)·g] = scales[o] · Σ_m codebooks[m, codes[o, j, m]].

    tensors: `codes` int32 (O, ceil(J·M·B/32)): the (O, J, M) codes, B bits each, packed densely along each row
             (group-major, then codebook); `codebooks` fp16 (M, 2^B, g); `scales` fp16 (O, 1).
    spec: num_codebooks M, nbits_per_codebook B, in_group_size g, shape [O, I]."""

    name = "aqlm"

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        codebooks, scales = tensors["codebooks"], tensors["scales"]
        return decode(unpack_codes(tensors["codes"], spec), codebooks.float(), scales.float())

    def nearest_codes(self, tensors, spec, target, max_change, beam_size):
        """The beam search of `update_codes` on ||T − Ŵ||² (H = I: the groups decouple), run on the groups furthest
        from their targets (4x the change budget: the others cannot gain more than those); the groups whose change
        gains most are taken."""
        codes = unpack_codes(tensors["codes"], spec)
        codebooks, scales = tensors["codebooks"].float(), tensors["scales"].float()
        out_features, groups, g = *codes.shape[:2], spec["in_group_size"]
        residual = (target - decode(codes, codebooks, scales)).view(out_features * groups, 1, g)
        candidates = residual.square().sum((1, 2)).topk(min(len(residual), math.ceil(4 * max_change * len(residual))))
        picked = candidates.indices
        codes = codes.view(out_features * groups, 1, -1)
        identity = torch.eye(g, device=target.device)[None]
        new_codes, delta = propose(residual[picked], identity, codes[picked], codebooks,
                                   scales.repeat_interleave(groups, 0)[picked], beam_size)
        gain = 2 * (delta * residual[picked]).sum(-1) - delta.square().sum(-1)  # −ΔL of each group's change
        take = largest_gains(gain[:, 0], max_change * len(residual) / len(picked))
        codes[picked[take]] = new_codes[take]
        return {"codes": pack_bits(codes.view(out_features, -1), spec["nbits_per_codebook"])}


def unpack_codes(packed: torch.Tensor, spec: dict) -> torch.Tensor:
    """(O, words) int32 -> (O, J, M) int64 codes."""
    out_features, groups = spec["shape"][0], spec["shape"][1] // spec["in_group_size"]
    codes = unpack_bits(packed, spec["nbits_per_codebook"], groups * spec["num_codebooks"])
    return codes.view(out_features, groups, spec["num_codebooks"])


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (O, J, M), codebooks (M, K, g), scales (O, 1) -> Ŵ (O, J·g)."""
    num_codebooks = codebooks.shape[0]
    # a lookup by F.embedding, not codebooks[m][codes]: its backward (AQLM's Adam on the codebooks) sums each entry's
    # gradients in one fixed order on any number of threads; indexing's accumulating backward does not
    groups = sum(F.embedding(codes[..., m], codebooks[m]) for m in range(num_codebooks))  # (O, J, g)
    return groups.flatten(1) * scales


def propose(G, H_blocks, codes, codebooks, scales, beam_size: int, chunk: int = 1 << 22):
    """For each row o and group j, the codes minimising ΔL of that group alone: its M codes re-chosen one codebook at
    a time, keeping the `beam_size` best states (ICM with a beam; the current codes are a candidate, so ΔL <= 0).
    G (O, J, g), H_blocks (J, g, g), codes (O, J, M). Returns the new codes and δ = their change of Ŵ (O, J, g)."""
    out_features, groups, M = codes.shape
    K, g = codebooks.shape[1:]
    s = scales.view(-1, 1, 1, 1)
    quads = torch.einsum("mkd,jde,mke->mjk", codebooks, H_blocks, codebooks)[:, :, None]  # C_kᵀ H_jj C_k, (M, J, 1, K)
    best_codes, best_delta = [], []
    for rows in torch.arange(out_features, device=G.device).split(max(1, chunk // (groups * beam_size * K))):
        s_rows, G_rows = s[rows], G[rows, :, None] / s[rows]  # (o, 1, 1, 1), (o, J, 1, g)
        beam = codes[rows].unsqueeze(2)  # (o, J, beam, M)
        offset = G.new_zeros(len(rows), groups, 1, g)  # Σ codewords of a state − Σ codewords of the current codes
        for m in range(M):
            C = codebooks[m]  # (K, g)
            base = offset - C[beam[..., m]]  # the state without its codebook-m codeword
            # ΔL(δ = s·(base + C_k)) / s² = const + lin·C_k + C_kᵀ H_jj C_k  (dividing by s² > 0 keeps each row's order)
            lin = 2 * torch.einsum("ojbd,jde->ojbe", base, H_blocks) - 2 * G_rows
            const = (base * (lin / 2 - G_rows)).sum(-1, keepdim=True)
            scores = torch.addmm(const.reshape(-1, 1), lin.reshape(-1, g), C.T).view(*base.shape[:3], K)
            scores += quads[m]  # (o, J, beam, K)
            top = scores.flatten(2).topk(min(beam_size, scores[0, 0].numel()), dim=2, largest=False).indices
            parent, word = top // K, top % K
            beam = beam.gather(2, parent[..., None].expand(-1, -1, -1, M)).clone()
            beam[..., m] = word
            offset = base.gather(2, parent[..., None].expand(-1, -1, -1, g)) + C[word]
        best_codes.append(beam[:, :, 0])  # topk sorts: the best state comes first
        best_delta.append(offset[:, :, 0] * s_rows[:, 0])
    return torch.cat(best_codes), torch.cat(best_delta)
