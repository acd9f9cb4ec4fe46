"""CJK inputs of issue 13 item 3, shared by the chunking and BM25 tests."""

from __future__ import annotations

_SENTENCES = [
    "收到商品后三十天内可以申请退货",
    "商品必须未经使用并保留原包装和吊牌",
    "我们收到退回的商品并检查无误后会在五个工作日内把款项退回到您的原支付账户",
    "贴身衣物定制商品和已经拆封的化妆品不支持退货",
    "订单付款成功后仓库会在两个工作日内发货",
    "订单金额满九十九元免运费不满九十九元收取十元运费",
    "发货后您会收到一条短信里面有快递单号",
    "如果收到的商品有破损请在签收后四十八小时内拍照并联系客服",
    "会员分为普通会员银卡会员和金卡会员",
    "每消费一元获得一个积分一百积分可以抵扣一元",
]


def long_chinese_paragraph(punctuated: bool = True, length: int = 3000) -> str:
    """A ``length``-character Chinese paragraph without spaces or line breaks.

    Numbered policy sentences (``第N条…``) cycled until ``length``; with ``punctuated`` each ends with ``。``,
    else the paragraph has no sentence boundary at all (only the token-bounded fallback can cut it).
    """
    parts: list[str] = []
    n = 0
    while sum(map(len, parts)) < length:
        parts.append(f"第{n + 1}条{_SENTENCES[n % len(_SENTENCES)]}" + ("。" if punctuated else ""))
        n += 1
    return "".join(parts)[:length]
