"""BM25 terms for Chinese, Japanese and mixed text (issue 13, item 3); Latin terms unchanged."""

from __future__ import annotations

import bm25s
import pytest
import Stemmer

from retrieval.bm25 import BM25Index, bm25_terms, cjk_bigrams

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
CORPUS = {
    1: POEM,
    2: "返品は30日以内です",
    3: "Refunds reach the card within 5 business days.",
    4: "订单付款成功后仓库会在两个工作日内发货",
    5: "送料は全国一律500円です",
    6: "在 App Store 搜索 ShopMate 即可下载我们的App。",
}


@pytest.fixture(scope="module")
def index() -> BM25Index:
    return BM25Index(list(CORPUS), list(CORPUS.values()))


@pytest.mark.parametrize(
    "query, top",
    [("故乡", 1), ("低头", 1), ("返品", 2), ("返品の期限", 2), ("什么时候发货", 4), ("送料はいくら", 5),
     ("ShopMate下载", 6), ("shopmate", 6), ("refund", 3), ("Refunding cards", 3)],
)
def test_cjk_and_mixed_queries_find_their_text(index, query, top):
    hits = index.search(query, 3)
    assert hits and hits[0][0] == top, hits


def test_the_issue_inputs_fail_with_the_old_tokenizer():
    """The baseline kept a whole CJK line as one term, so a word inside it matched nothing."""
    stem = Stemmer.Stemmer("english")
    old = BM25Index(list(CORPUS), list(CORPUS.values()),
                    analyzer=lambda t: bm25s.tokenize(list(t), stopwords="en", stemmer=stem, return_ids=False,
                                                      show_progress=False))
    assert old.search("故乡", 3) == [] and old.search("返品", 3) == []


def test_terms():
    assert bm25_terms(["低头思故乡"]) == [["低", "头", "思", "故", "乡", "低头", "头思", "思故", "故乡"]]
    # Latin words as before (stop words out, Snowball stems), then each CJK run's terms; a lone character is kept
    assert bm25_terms(["The refunds of ShopMate下载 鞋"]) == [["refund", "shopmat", "下", "载", "下载", "鞋"]]
    # NFKC: full-width Latin and half-width katakana are folded to their usual forms
    assert bm25_terms(["ＲＥＦＵＮＤ ﾎﾟｲﾝﾄ"]) == [["refund", "ポ", "イ", "ン", "ト", "ポイ", "イン", "ント"]]
    assert bm25_terms(["", "the of", "。！"]) == [[], [], []]
    assert cjk_bigrams("返品は") == ["返品", "品は"] and cjk_bigrams("鞋") == ["鞋"]


def test_latin_terms_equal_the_previous_tokenizer():
    texts = ["Refunds reach the card within 5 business days.", "Shipping is FREE on orders over $50!",
             "Reset your password: use the link on the sign-in page."]
    old = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False,
                         show_progress=False)
    assert bm25_terms(texts) == old


def test_single_character_query_matches_through_unigrams(index):
    assert index.search("霜", 3)[0][0] == 1
