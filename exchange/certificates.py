"""Retirement certificates (碳中和证书) a person can read, print and verify: HTML and PDF renderings.

Both take the dict `registry.retirement_by_code` returns (id, quantity_kg, beneficiary, purpose,
certificate_code, created_at, account, ranges[{scheme, project, project_name, methodology, vintage,
lo, hi, serial}]) and the verification URL the caller chose (e.g. f"{base_url}/verify/{code}"), which
the page prints and encodes as a QR code (segno). Nothing here reads the database or the network.

- `render_certificate_html(cert, verify_url) -> str`: one self-contained page (inline CSS, inline SVG
  QR code, no external fonts, scripts or images). Every string from the record is HTML-escaped:
  beneficiary and purpose are user input.
- `render_certificate_pdf(cert, verify_url) -> bytes`: the same content with reportlab. User text is
  set run by run in a font that prints it: Chinese (GBK) in the CID font STSong-Light and Hangul in
  HYSMyeongJo-Medium (reportlab's; viewers supply the glyphs, they are not embedded), everything
  else in DejaVu Sans (exchange/data, embedded as a subset).
  Output is byte-for-byte deterministic for the same input (reportlab's invariant mode).

Quantities are shown in tonnes with 3 decimals, times in China Standard Time (UTC+8, no daylight saving).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import itertools
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import segno

from exchange.errors import CarbonxError
from matching.units import format_tonnes

_CST = dt.timezone(dt.timedelta(hours=8), "UTC+8")
# The characters RFC 3986 allows in a URL (no spaces, quotes or angle brackets): what a QR scanner can open.
_URL = re.compile(r"^https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+$")
_RANGE_FIELDS = ("scheme", "project", "project_name", "methodology", "vintage", "lo", "hi", "serial")

METHODOLOGIES = {
    "forest_carbon_sink": ("森林碳汇", "Forest carbon sink"),
    "grassland_carbon_sink": ("草地碳汇", "Grassland carbon sink"),
    "wetland_carbon_sink": ("湿地碳汇", "Wetland carbon sink"),
    "energy_substitution": ("能源替代", "Energy substitution"),
    "renewable_energy": ("可再生能源", "Renewable energy"),
    "energy_efficiency": ("节能增效", "Energy efficiency"),
    "methane_recovery": ("甲烷回收利用", "Methane recovery"),
    "low_carbon_transport": ("低碳交通", "Low-carbon transport"),
    "other": ("其他", "Other"),
}


def verification_url(base_url: str, code: str) -> str:
    """The public page that verifies a certificate: `{base_url}/verify/{code}`."""
    return f"{base_url.rstrip('/')}/verify/{code}"


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not _URL.match(url) or len(url) > 500:
        raise CarbonxError("invalid_url", f"verification URL must be an http(s) URL without spaces, got {url!r}")
    return url


def _bad(message: str) -> CarbonxError:
    return CarbonxError("invalid_certificate", message)


def _checked(cert: Mapping[str, Any]) -> Mapping[str, Any]:
    """Refuse a record that would print a wrong certificate (a missing field, ranges that do not add up)."""
    if not isinstance(cert, Mapping):
        raise _bad("a certificate is a retirement record (a mapping)")
    for k in ("quantity_kg", "beneficiary", "purpose", "certificate_code", "created_at", "ranges"):
        if k not in cert:
            raise _bad(f"the retirement record has no {k!r}")
    qty = cert["quantity_kg"]
    if isinstance(qty, bool) or not isinstance(qty, int) or qty <= 0:
        raise _bad(f"quantity_kg must be a positive integer, got {qty!r}")
    ranges = cert["ranges"]
    if not isinstance(ranges, list) or not ranges:
        raise _bad("a retirement names at least one serial range")
    for i, r in enumerate(ranges):
        if not isinstance(r, Mapping) or any(k not in r for k in _RANGE_FIELDS):
            raise _bad(f"ranges[{i}] must have {list(_RANGE_FIELDS)}")
        if not (isinstance(r["lo"], int) and isinstance(r["hi"], int) and r["lo"] < r["hi"]):
            raise _bad(f"ranges[{i}]: lo < hi, integers (half-open [lo, hi))")
    if sum(r["hi"] - r["lo"] for r in ranges) != qty:
        raise _bad("the serial ranges do not add up to the retired quantity")
    _when(cert["created_at"])
    return cert


def _when(value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _bad(f"created_at {value!r} is not an ISO 8601 time") from None
    if not isinstance(value, dt.datetime):
        raise _bad(f"created_at must be a datetime or ISO 8601 string, got {value!r}")
    # The database stores timestamptz; a naive value can only have come from UTC.
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _date_text(value: Any) -> str:
    return _when(value).astimezone(_CST).strftime("%Y-%m-%d %H:%M") + " (UTC+8)"


def _methodology(key: str) -> tuple[str, str]:
    return METHODOLOGIES.get(key, (key, key))


def _projects(cert: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """Distinct (project code, project name, vintage), in the order the ranges name them."""
    seen: dict[tuple[str, str, int], None] = {}
    for r in cert["ranges"]:
        seen.setdefault((str(r["project"]), str(r["project_name"]), r["vintage"]), None)
    return list(seen)


def qr_svg(url: str, *, scale: int = 4) -> str:
    """The URL as an inline SVG QR code (error correction M, 4-module quiet zone)."""
    qr = segno.make(_check_url(url), error="m", boost_error=False, micro=False)
    return qr.svg_inline(scale=scale, border=4, dark="#000", light="#fff")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_CSS = """
@page { size: A4; margin: 16mm; }
.verdict { max-width: 210mm; margin: 12px auto 0; padding: 10px 16px; background: #e3f4e6; border: 1px solid #2e7d3e;
  color: #1f5c2c; font-weight: 600; }
.verdict .en { display: block; font-weight: 400; font-size: 0.9em; }
@media print { .verdict { display: none; } }
* { box-sizing: border-box; }
body { margin: 0; background: #eef2ee; color: #1d2a1f;
       font-family: "PingFang SC", "Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", "Hiragino Sans GB",
                    "Helvetica Neue", Arial, sans-serif; }
main { max-width: 820px; margin: 24px auto; background: #fff; border: 6px double #2e6b3a; padding: 32px 40px; }
h1 { margin: 0; text-align: center; font-size: 30px; letter-spacing: 6px; color: #2e6b3a; }
.en { font-size: 0.62em; letter-spacing: 0; color: #4a5a4c; font-weight: normal; }
h1 .en { display: block; font-size: 16px; letter-spacing: 1px; margin-top: 4px; }
dl { display: grid; grid-template-columns: 11em 1fr; gap: 10px 16px; margin: 28px 0; }
dt { font-weight: bold; color: #2e6b3a; }
dd { margin: 0; overflow-wrap: anywhere; }
.qty { font-size: 22px; font-weight: bold; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #b9c9bb; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #e4efe5; }
td.num { text-align: right; white-space: nowrap; }
code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size: 12px; }
.verify { display: flex; gap: 20px; align-items: center; margin-top: 28px; border-top: 1px solid #b9c9bb;
          padding-top: 20px; }
.verify svg { flex: none; }
.code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size: 20px; font-weight: bold;
        letter-spacing: 2px; }
.small { font-size: 12px; color: #4a5a4c; overflow-wrap: anywhere; }
@media print { body { background: #fff; } main { margin: 0; max-width: none; } }
"""


def _label(zh: str, en: str) -> str:
    return f'{zh} <span class="en" lang="en">{en}</span>'


def _verdict(code: str) -> str:
    return ('<p class="verdict" role="status">✓ 真实有效：本登记簿签发了证书 ' + code + '，下列序列号均已注销。'
            '<span class="en" lang="en">Genuine: this registry issued certificate ' + code + ' and the serial '
            'ranges below are retired.</span></p>\n')


def render_certificate_html(cert: Mapping[str, Any], verify_url: str, verified: bool = False) -> str:
    """A self-contained HTML page for a retirement record (`registry.retirement_by_code`). With
    `verified`, as the public verification page shows it: a verdict first, that the registry holds
    this certificate and its serial ranges are retired."""
    cert = _checked(cert)
    url = _check_url(verify_url)
    e = html.escape
    code = e(str(cert["certificate_code"]))
    when = _when(cert["created_at"])
    projects = "<br>".join(f"{e(name)} ({e(code_)}) · {e(str(vintage))}" for code_, name, vintage in _projects(cert))
    rows = []
    for r in cert["ranges"]:
        zh, en = _methodology(str(r["methodology"]))
        rows.append(
            f"<tr><td><code>{e(str(r['serial']))}</code></td>"
            f"<td>{e(str(r['project_name']))} <span class=\"small\">({e(str(r['project']))})</span><br>"
            f"<span class=\"small\">{e(zh)} · {e(en)}</span></td>"
            f"<td>{e(str(r['vintage']))}</td><td class=\"num\">{format_tonnes(r['hi'] - r['lo'])}</td></tr>"
        )
    account = (f"<dt>{_label('注销账户', 'Retired by account')}</dt><dd>{e(str(cert['account']))}</dd>"
               if cert.get("account") else "")
    return f"""<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>碳中和证书 Carbon Neutrality Certificate {code}</title>
<style>{_CSS}</style>
</head>
<body>
{_verdict(code) if verified else ""}<main>
<h1>碳中和证书<span class="en" lang="en">Carbon Neutrality Certificate</span></h1>
<dl>
<dt>{_label('受益方', 'Beneficiary')}</dt><dd>{e(str(cert['beneficiary']))}</dd>
<dt>{_label('用途', 'Purpose')}</dt><dd>{e(str(cert['purpose']))}</dd>
<dt>{_label('注销量', 'Quantity retired')}</dt>
<dd class="qty">{format_tonnes(cert['quantity_kg'])} t CO<sub>2</sub>e</dd>
<dt>{_label('项目与年份', 'Project and vintage')}</dt><dd>{projects}</dd>
<dt>{_label('注销时间', 'Retired on')}</dt><dd><time datetime="{e(when.isoformat())}">{e(_date_text(when))}</time></dd>
{account}
</dl>
<table>
<thead><tr><th>{_label('序列号', 'Serial range')}</th><th>{_label('项目', 'Project')}</th>
<th>{_label('年份', 'Vintage')}</th><th>{_label('数量 (吨)', 'Tonnes')}</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody>
</table>
<div class="verify">
{qr_svg(url)}
<div>
<div>{_label('验证码', 'Verification code')}</div>
<div class="code">{code}</div>
<p class="small">扫码或访问以下网址核验本证书 · Scan or visit to verify this certificate:<br>
<a href="{e(url)}">{e(url)}</a></p>
<p class="small">所列序列号的核证减排量已注销，不可再交易或转让。
<span lang="en">The reductions with the serial numbers above are retired and can never be traded or transferred
again.</span></p>
</div>
</div>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------
_CJK = "STSong-Light"
_KOREAN = "HYSMyeongJo-Medium"  # CID font as STSong-Light: the viewer supplies the glyphs
_OTHER = "DejaVuSans"  # embedded (a subset): Latin, Greek, Cyrillic and more beyond GBK
# GBK characters that STSong-Light's encoding (UniGB-UCS2-H) nevertheless leaves unmapped: the
# middle dot, a few Latin letters, compatibility ideographs and vertical forms (checked against
# the CMap with pdfminer.six).
_NOT_IN_STSONG = frozenset([0x7F, 0xB7, 0x144, 0x148, 0x251, 0x261, 0xF979, 0xF995, 0xF9E7, 0xF9F1, 0xFA0C,
                            0xFE31, *range(0xFE33, 0xFE45)])


def _register_cjk_font() -> None:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfbase.ttfonts import TTFont

    registered = pdfmetrics.getRegisteredFontNames()
    for name in (_CJK, _KOREAN):
        if name not in registered:
            pdfmetrics.registerFont(UnicodeCIDFont(name))
    if _OTHER not in registered:
        with resources.as_file(resources.files("exchange.data") / "DejaVuSans.ttf") as path:
            pdfmetrics.registerFont(TTFont(_OTHER, str(path)))


def _font_for(ch: str) -> str:
    """The font that prints `ch`: Chinese (GBK) in STSong-Light, Hangul in the Korean CID font,
    everything else in DejaVu Sans. All in STSong-Light, ø, Ł, ß or a Korean name printed as
    nothing, while the JSON and HTML showed them (review30)."""
    cp = ord(ch)
    if 0xAC00 <= cp <= 0xD7A3 or 0x3131 <= cp <= 0x318E:  # Hangul syllables, compatibility jamo
        return _KOREAN
    try:
        ch.encode("gbk")
    except UnicodeEncodeError:
        return _OTHER
    return _OTHER if cp in _NOT_IN_STSONG else _CJK


def _pdf_text(text: Any) -> str:
    """`text` as Paragraph markup, escaped, each run of characters in a font that prints them."""
    return "".join(_run(font, "".join(run)) for font, run in itertools.groupby(str(text), _font_for))


def _run(font: str, text: str) -> str:
    escaped = _pdf_escape(text)
    return escaped if font == _CJK else f'<font name="{font}">{escaped}</font>'


def _pdf_escape(text: Any) -> str:
    # reportlab Paragraphs parse a small XML markup: user text must not be able to open a tag.
    return html.escape(str(text), quote=False)


def _qr_drawing(url: str, size: float) -> Any:
    from reportlab.graphics.shapes import Drawing, Rect
    from reportlab.lib.colors import black

    qr = segno.make(url, error="m", boost_error=False, micro=False)
    rows = [list(row) for row in qr.matrix_iter(scale=1, border=4)]
    n = len(rows)
    m = size / n
    d = Drawing(size, size)
    for y, row in enumerate(rows):
        x = 0
        while x < n:  # one rectangle per horizontal run of dark modules keeps the file small
            if row[x]:
                start = x
                while x < n and row[x]:
                    x += 1
                d.add(Rect(start * m, size - (y + 1) * m, (x - start) * m, m, fillColor=black, strokeColor=None,
                           strokeWidth=0))
            else:
                x += 1
    return d


def _serial_paragraph(serial: str, width: float, style: Any) -> Any:
    """A serial on one line when it fits (smaller type down to 6 pt), else broken only after hyphens, with
    the unit numbers `first-last` kept together: a serial broken at an arbitrary character could be misread."""
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.platypus import Paragraph

    size = style.fontSize
    while stringWidth(serial, style.fontName, size) > width and size > 6:
        size -= 0.5
    fitted = ParagraphStyle(f"serial{size}", parent=style, fontSize=size, leading=size + 2)
    head, first, last = serial.rsplit("-", 2) if serial.count("-") >= 2 else (serial, "", "")
    parts = [p + "-" for p in head.split("-")] + ([f"{first}-{last}"] if first else [])
    if not first:
        parts[-1] = parts[-1][:-1]
    lines = [""]
    for part in parts:
        if lines[-1] and stringWidth(lines[-1] + part, style.fontName, size) > width:
            lines.append("")
        lines[-1] += part
    return Paragraph("<br/>".join(_pdf_escape(line) for line in lines), fitted)


def render_certificate_pdf(cert: Mapping[str, Any], verify_url: str, *, compress: bool = True) -> bytes:
    """The certificate as an A4 PDF. `compress=False` leaves page streams readable (for tests and audits)."""
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_CENTER
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    cert = _checked(cert)
    url = _check_url(verify_url)
    _register_cjk_font()
    code = str(cert["certificate_code"])
    green = colors.HexColor("#2e6b3a")

    base = ParagraphStyle("base", fontName=_CJK, fontSize=10.5, leading=15, wordWrap="CJK")
    title = ParagraphStyle("title", parent=base, fontSize=24, leading=30, alignment=TA_CENTER, textColor=green)
    subtitle = ParagraphStyle("subtitle", parent=base, fontName="Helvetica", fontSize=12, leading=16,
                              alignment=TA_CENTER, textColor=colors.HexColor("#4a5a4c"))
    label = ParagraphStyle("label", parent=base, textColor=green, fontSize=10, leading=13)
    small = ParagraphStyle("small", parent=base, fontSize=8.5, leading=11)
    mono = ParagraphStyle("mono", parent=base, fontName="Courier", fontSize=8, leading=10, wordWrap=None)
    codestyle = ParagraphStyle("code", parent=base, fontName="Helvetica-Bold", fontSize=15, leading=20)

    def lab(zh: str, en: str) -> Paragraph:
        return Paragraph(f'{zh}<br/><font name="Helvetica" size="8">{en}</font>', label)

    projects = "<br/>".join(f"{_pdf_text(name)} ({_pdf_escape(pc)}) {_pdf_text('·')} {vintage}"
                            for pc, name, vintage in _projects(cert))
    fields = [
        [lab("受益方", "Beneficiary"), Paragraph(_pdf_text(cert["beneficiary"]), base)],
        [lab("用途", "Purpose"), Paragraph(_pdf_text(cert["purpose"]), base)],
        [lab("注销量", "Quantity retired"),
         Paragraph(f'<font name="Helvetica-Bold" size="14">{format_tonnes(cert["quantity_kg"])} t CO<sub>2</sub>e'
                   "</font>", base)],
        [lab("项目与年份", "Project and vintage"), Paragraph(projects, base)],
        [lab("注销时间", "Retired on"),
         Paragraph(f'<font name="Helvetica">{_date_text(cert["created_at"])}</font>', base)],
    ]
    if cert.get("account"):
        fields.append([lab("注销账户", "Retired by account"),
                       Paragraph(f'<font name="Helvetica">{_pdf_escape(cert["account"])}</font>', base)])
    width = A4[0] - 36 * mm
    field_table = Table(fields, colWidths=[38 * mm, width - 38 * mm])
    field_table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 7)]))

    serial_width = 72 * mm
    ranges = [[lab("序列号", "Serial range"), lab("项目", "Project"), lab("年份", "Vintage"),
               lab("数量 (吨)", "Tonnes")]]
    for r in cert["ranges"]:
        zh, en = _methodology(str(r["methodology"]))
        ranges.append([
            _serial_paragraph(str(r["serial"]), serial_width - 12, mono),
            Paragraph(f"{_pdf_text(r['project_name'])} ({_pdf_escape(r['project'])})<br/>"
                      f"{_pdf_escape(zh)} {_pdf_text('·')} {_pdf_escape(en)}", small),
            Paragraph(_pdf_escape(r["vintage"]), small),
            Paragraph(f'<font name="Helvetica">{format_tonnes(r["hi"] - r["lo"])}</font>', small),
        ])
    range_table = Table(ranges, colWidths=[serial_width, width - serial_width - 36 * mm, 14 * mm, 22 * mm],
                        repeatRows=1)
    range_table.setStyle(TableStyle([
        ("GRID", (0, 0), (-1, -1), 0.5, colors.HexColor("#b9c9bb")),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e4efe5")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))

    verify_text = [
        lab("验证码", "Verification code"),
        Paragraph(_pdf_escape(code), codestyle),
        Paragraph("扫码或访问以下网址核验本证书<br/>"
                  f'<font name="Helvetica">Scan or visit to verify this certificate:<br/>'
                  f'<a href="{_pdf_escape(url)}" color="blue">{_pdf_escape(url)}</a></font>', small),
        Spacer(1, 4),
        Paragraph("所列序列号的核证减排量已注销，不可再交易或转让。<br/>"
                  '<font name="Helvetica">The reductions with the serial numbers above are retired and can never '
                  "be traded or transferred again.</font>", small),
    ]
    verify_table = Table([[_qr_drawing(url, 36 * mm), verify_text]], colWidths=[42 * mm, width - 42 * mm])
    verify_table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "MIDDLE")]))

    out = io.BytesIO()
    doc = SimpleDocTemplate(
        out, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=18 * mm, bottomMargin=18 * mm,
        title=f"碳中和证书 Carbon Neutrality Certificate {code}", author="carbonx registry",
        subject=f"Retirement {format_tonnes(cert['quantity_kg'])} t CO2e",
        invariant=1, pageCompression=1 if compress else 0,
    )

    def frame(canvas: Any, _doc: Any) -> None:
        canvas.saveState()
        canvas.setStrokeColor(green)
        canvas.setLineWidth(2)
        canvas.rect(10 * mm, 10 * mm, A4[0] - 20 * mm, A4[1] - 20 * mm)
        canvas.setLineWidth(0.5)
        canvas.rect(12 * mm, 12 * mm, A4[0] - 24 * mm, A4[1] - 24 * mm)
        canvas.setFont("Helvetica", 7)
        canvas.drawCentredString(A4[0] / 2, 14 * mm, f"{code} · page {canvas.getPageNumber()}")
        canvas.restoreState()

    doc.build([
        Paragraph("碳中和证书", title),
        Paragraph("Carbon Neutrality Certificate", subtitle),
        Spacer(1, 8 * mm),
        field_table,
        Spacer(1, 5 * mm),
        range_table,
        Spacer(1, 8 * mm),
        verify_table,
    ], onFirstPage=frame, onLaterPages=frame)
    return out.getvalue()
