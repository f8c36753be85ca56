"""What each message says, per kind and language: ``${var}`` templates, as
Chinese SMS providers register them, filled from the outbox row's payload.

The variables are the same for every channel: the SMS gateway gets the template
id and the variables (the provider fills its registered copy), e-mail and the
webhook get the text rendered here. A card number is only ever the masked form
the database put in the payload.
"""

from __future__ import annotations

from decimal import Decimal
from string import Template
from typing import Any

# kind -> language -> (subject, text)
TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "accrual": {
        "zh-CN": ("积分到账", "您的会员卡${card}于${merchant}获得${points}积分，当前余额${balance}积分。"),
        "en": ("Points earned", "Card ${card} earned ${points} points at ${merchant}. Balance: ${balance} points."),
    },
    "redemption": {
        "zh-CN": ("积分消费", "您的会员卡${card}于${merchant}使用${points}积分，当前余额${balance}积分。"),
        "en": ("Points spent", "Card ${card} spent ${points} points at ${merchant}. Balance: ${balance} points."),
    },
    "cash_out": {
        "zh-CN": ("积分兑现", "您的会员卡${card}已将${points}积分兑换为现金${amount}元，转入您的银行卡。"
                            "当前余额${balance}积分。"),
        "en": ("Points cashed out", "Card ${card} converted ${points} points into CNY ${amount}, credited to your"
                                    " bank card. Balance: ${balance} points."),
    },
    "insurance": {
        "zh-CN": ("保费支付", "您的会员卡${card}已使用${points}积分支付保费${amount}元。当前余额${balance}积分。"),
        "en": ("Premium paid", "Card ${card} paid an insurance premium of CNY ${amount} with ${points} points."
                               " Balance: ${balance} points."),
    },
    "card_blocked": {
        "zh-CN": ("会员卡已冻结", "您的会员卡${card}已被冻结，如非本人操作请联系客服。"),
        "en": ("Card blocked", "Card ${card} has been blocked. If you did not ask for this, call us."),
    },
    "points_expiring": {
        "zh-CN": ("积分即将过期", "您的会员卡${card}有${points}积分将于${expires_on}过期，请尽快使用。"),
        "en": ("Points expiring", "Card ${card}: ${points} points expire on ${expires_on}. Use them before then."),
    },
    "clearing_statement": {
        "zh-CN": ("每日清算单", "${merchant}（${merchant_id}）${date}清算：发放${issued}积分，兑付${redeemed}积分，"
                              "发放费${issue_fee}元，兑付额${redeem_value}元，净额${net}元。"),
        "en": ("Daily clearing statement", "${merchant} (${merchant_id}) clearing of ${date}: ${issued} points issued,"
                                           " ${redeemed} redeemed, issue fee CNY ${issue_fee}, redemption value"
                                           " CNY ${redeem_value}, net CNY ${net}."),
    },
}


def _yuan(fen: Any) -> str:
    return str((Decimal(int(fen or 0)) / 100).quantize(Decimal("0.01")))


def variables(payload: dict[str, Any]) -> dict[str, str]:
    """The template variables of a message (every value a string, as SMS providers want)."""
    p = payload
    values = {
        "card": p.get("card", ""), "points": p.get("points", ""), "balance": p.get("points_balance", ""),
        "merchant": p.get("merchant_name") or p.get("merchant_id", ""), "merchant_id": p.get("merchant_id", ""),
        "amount": _yuan(p.get("amount_fen")), "date": p.get("business_date", ""), "expires_on": p.get("expires_on", ""),
        "issued": p.get("points_issued", ""), "redeemed": p.get("points_redeemed", ""),
        "issue_fee": _yuan(p.get("issue_fee_fen")), "redeem_value": _yuan(p.get("redeem_value_fen")),
        "net": _yuan(p.get("net_fen")),
    }
    return {k: "" if v is None else str(v) for k, v in values.items()}


def render(kind: str, language: str, payload: dict[str, Any]) -> tuple[str, str]:
    """(subject, text) of a message, in its language (English when there is no such template)."""
    by_language = TEMPLATES[kind]
    subject, text = by_language.get(language, by_language["en"])
    return subject, Template(text).safe_substitute(variables(payload))
