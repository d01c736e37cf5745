"""Text <-> video retrieval recall of an aligned tower (the output of ``hilight align``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hilight.training.align import CaptionTokenizer, Clips, load_aligner


def retrieval_metrics(sim: torch.Tensor) -> dict:
    """R@1/5/10 and median rank, text->video and video->text, for a [texts, videos] similarity
    matrix whose diagonal holds the matching pairs."""
    out = {}
    for name, m in (("text_to_video", sim), ("video_to_text", sim.T)):
        correct = m.diagonal()[:, None]
        ranks = (m > correct).sum(-1) + 1  # 1 = best
        out[name] = {f"R@{k}": float((ranks <= k).float().mean()) for k in (1, 5, 10)}
        out[name]["median_rank"] = float(ranks.float().median())
    return out


@torch.no_grad()
def eval_retrieval(model_dir: str | Path, data: str | Path, videos: str | Path, batch_size: int = 16) -> dict:
    aligner, tokenizer, video_cfg = load_aligner(model_dir)
    clips = Clips(str(data), str(videos), video_cfg, "")
    captions = CaptionTokenizer(tokenizer, aligner.text.cfg.max_positions, [])
    v_emb, t_emb = [], []
    for s in range(0, len(clips), batch_size):
        idx = list(range(s, min(len(clips), s + batch_size)))
        v_emb.append(aligner.encode_video(torch.stack([clips.frames(i) for i in idx]))[0])
        ids, mask, _ = captions([clips.pairs[i][1] for i in idx], False)
        t_emb.append(aligner.text(ids, mask)[1])
    v, t = F.normalize(torch.cat(v_emb), dim=-1), F.normalize(torch.cat(t_emb), dim=-1)
    result = retrieval_metrics(t @ v.T)
    result.update(pairs=len(clips), skipped=clips.bad)
    return result


def retrieval_markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", f"{result['pairs']} caption-video pairs.", "",
             "| direction | R@1 | R@5 | R@10 | median rank |", "|---|---|---|---|---|"]
    for name in ("text_to_video", "video_to_text"):
        r = result[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['R@1']:.1%} | {r['R@5']:.1%} | {r['R@10']:.1%} | "
                     f"{r['median_rank']:.0f} |")
    return "\n".join(lines) + "\n"


