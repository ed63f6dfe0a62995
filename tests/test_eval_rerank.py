"""ITM re-ranking of retrieval candidates: candidates by hand, re-ranked recall on a fixed score matrix, R@1 never
lowered when the ITM scores agree with the truth, evaluate_retrieval's re-ranking against a direct computation, and
2 gloo ranks against 1."""
import pytest
import torch

from distributed import run_ranks
from shard_fixtures import WordTokenizer
from test_retrieval_eval import _write as write_retrieval
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.eval.metrics import recall_at_k
from vlmo_ds.eval.rerank import reranked_matrices, reranked_recall, top_candidates
from vlmo_ds.eval.retrieval import evaluate_retrieval, iter_images, load_retrieval_set
from vlmo_ds.eval.tables import retrieval_table
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo

SIM = torch.tensor([[0.1, 0.9, 0.5, 0.2],
                    [0.8, 0.3, 0.4, 0.1],
                    [0.2, 0.6, 0.7, 0.9]])
OWNERS = torch.tensor([0, 0, 1, 2])
CFG = preset("tiny", drop_path_rate=0.0)


def _agreeing_itm(sim: torch.Tensor, owners: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """[I, T] ITM log-odds that put every right pair above every wrong one (sign -1: the reverse)."""
    right = owners[None, :] == torch.arange(sim.shape[0])[:, None]
    return sign * torch.where(right, 5.0, -5.0)


def _rerank(sim, owners, itm, k, ks=(1, 2, 3), itc_scale=1.0):
    i2t, t2i = top_candidates(sim, k)
    tr_scores = itm.gather(1, i2t)
    ir_scores = itm.t().gather(1, t2i)
    return reranked_recall(*reranked_matrices(sim, i2t, tr_scores, t2i, ir_scores, itc_scale), owners, ks)


def test_candidates_by_hand():
    i2t, t2i = top_candidates(torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.3]]), 2)
    assert i2t.tolist() == [[0, 1], [0, 2]]
    assert t2i.tolist() == [[0, 1], [0, 1], [1, 0]]
    i2t, t2i = top_candidates(torch.tensor([[0.5, 0.5, 0.5]]), 5)  # k capped; ties in index order
    assert i2t.tolist() == [[0, 1, 2]] and t2i.tolist() == [[0], [0], [0]]


def test_reranked_recall_on_a_fixed_matrix():
    plain = recall_at_k(SIM, OWNERS, ks=(1, 2, 3))
    assert (plain["tr@1"], plain["ir@1"]) == (pytest.approx(2 / 3), 0.5)
    out = _rerank(SIM, OWNERS, _agreeing_itm(SIM, OWNERS), k=2)
    # TR: image 1's caption t2 is its 2nd candidate (0.8, 0.4): ITM lifts it to rank 1 -> all three images hit.
    # IR: captions t0 and t2 have their own image outside their 2 candidates, so they stay at rank 3.
    assert out == pytest.approx({"rerank_tr@1": 1.0, "rerank_tr@2": 1.0, "rerank_tr@3": 1.0,
                                 "rerank_ir@1": 0.5, "rerank_ir@2": 0.5, "rerank_ir@3": 1.0,
                                 "rerank_r_mean": 5 / 6})
    # an ITM head that is always wrong reorders only the top k: hits at k+1 and beyond are kept
    wrong = _rerank(SIM, OWNERS, _agreeing_itm(SIM, OWNERS, -1.0), k=2)
    assert wrong["rerank_tr@1"] == 0.0 and wrong["rerank_tr@3"] == plain["tr@3"]


def test_candidates_come_first_and_the_rest_keep_their_order():
    i2t, t2i = top_candidates(SIM, 2)
    scores = torch.tensor([[-3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])
    tr, ir = reranked_matrices(SIM, i2t, scores, t2i, torch.zeros(4, 2))
    for row in range(3):
        order = torch.argsort(tr[row], descending=True).tolist()
        assert set(order[:2]) == set(i2t[row].tolist())
        rest = [t for t in range(4) if t not in i2t[row]]
        assert order[2:] == sorted(rest, key=lambda t: -SIM[row, t].item())
    assert torch.argsort(tr[0], descending=True).tolist()[:2] == [2, 1]  # ITM 4.0 + 0.5 beats -3.0 + 0.9
    assert torch.equal(ir.argmax(0), SIM.argmax(0))  # equal ITM scores: the ITC order decides


def test_r_at_1_never_drops_where_the_itm_scores_agree():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        sim = torch.rand(6, 11, generator=g)
        owners = torch.randint(0, 6, (11,), generator=g)
        plain = recall_at_k(sim, owners, ks=(1,))
        for k in (1, 3, 6):
            out = _rerank(sim, owners, _agreeing_itm(sim, owners), k, ks=(1,))
            assert out["rerank_tr@1"] >= plain["tr@1"] and out["rerank_ir@1"] >= plain["ir@1"], (trial, k)
            # every query whose right item was among its k candidates is now a hit
            ir_hits = sum(owners[t].item() in top_candidates(sim, k)[1][t].tolist() for t in range(11)) / 11
            assert out["rerank_ir@1"] == pytest.approx(ir_hits)


def _model():
    torch.manual_seed(0)
    return VLMo(CFG).eval()


def _direct(model, folder, k):
    data = load_retrieval_set(folder)
    images = torch.stack(list(iter_images(data.images, build_image_transform(CFG.image_size, train=False))))
    text = WordTokenizer().batch_encode(data.captions, CFG.max_text_len)
    with torch.no_grad():
        sim = model.itc_image(model.encode_image(images))[0] @ model.itc_text(
            model.encode_text(text["text_ids"], text["text_mask"]))[0].t()
        n_i, n_t = sim.shape
        pairs_image = images.repeat_interleave(n_t, 0)
        logits = model.itm_logits(model.encode_pair(text["text_ids"].repeat(n_i, 1), text["text_mask"].repeat(n_i, 1),
                                                    pairs_image))
        itm = (logits[:, 1] - logits[:, 0]).reshape(n_i, n_t)
    return _rerank(sim, data.text_to_image, itm, k, ks=(1, 5, 10), itc_scale=float(model.logit_scale.exp()))


def test_evaluate_retrieval_reranks_as_a_direct_computation(tmp_path):
    write_retrieval(tmp_path, 7)
    metrics = evaluate_retrieval(_model(), tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len,
                                 batch_size=4, rerank_k=3)
    expected = _direct(_model(), tmp_path, 3)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert metrics["rerank_k"] == 3 and "tr@1" in metrics
    table = retrieval_table(metrics)
    assert "re-ranked by ITM, top 3 candidates:" in table and table.count("TR (image->text)") == 2


def _rank_fn(rank, world, folder):
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].__name__))
    metrics = evaluate_retrieval(model, folder, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=4,
                                 rank=rank, world_size=world, rerank_k=3)
    return metrics, calls


@pytest.mark.slow
def test_two_ranks_rerank_as_one(tmp_path):
    write_retrieval(tmp_path, 7)
    single = evaluate_retrieval(_model(), tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=4,
                                rerank_k=3)
    results = run_ranks(_rank_fn, 2, str(tmp_path))
    keys = [k for k in single if k.startswith("rerank_")]
    for metrics, _ in results:
        assert {k: metrics[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, abs=1e-9)
    (_, calls0), (_, calls1) = results
    assert calls0 == calls1 and "_itm_scores" in calls0


def test_itc_scale_weighs_the_similarity_as_a_logit():
    """The candidates' order is ITM log-odds + itc_scale x similarity: a large scale keeps the ITC order."""
    i2t, t2i = top_candidates(SIM, 2)
    scores = torch.tensor([[-3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])
    zeros = torch.zeros(4, 2)
    top = torch.argsort(reranked_matrices(SIM, i2t, scores, t2i, zeros)[0][0], descending=True)[:2].tolist()
    assert top == [2, 1]  # 4.0 + 0.5 beats -3.0 + 0.9
    tr, _ = reranked_matrices(SIM, i2t, scores, t2i, zeros, itc_scale=100.0)
    assert torch.argsort(tr[0], descending=True)[:2].tolist() == i2t[0].tolist()  # -3 + 90 beats 4 + 50
