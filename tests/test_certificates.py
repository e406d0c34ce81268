"""Certificates: the HTML page and the PDF carry every field, escape user input, and their QR codes encode the
verification URL (checked with a small independent QR reader below, since no decoder library is installed)."""

import datetime as dt
import io
import re

import pytest

from exchange.certificates import (
    _CJK,
    _KOREAN,
    _OTHER,
    _font_for,
    _qr_drawing,
    qr_svg,
    render_certificate_html,
    render_certificate_pdf,
    verification_url,
)
from exchange.errors import CarbonxError

CODE = "CX-7KQ2-M9PD-XW4R"
URL = verification_url("https://carbonx.example/", CODE)


def _cert(**changes):
    cert = {
        "id": 7,
        "quantity_kg": 1200,
        "beneficiary": "成都绿色公益平台 <script>alert('x')</script>",
        "purpose": "Launch event carbon neutrality 发布会碳中和 & <b>friends</b>",
        "certificate_code": CODE,
        "created_at": dt.datetime(2026, 3, 1, 2, 30, tzinfo=dt.UTC),
        "account": "EVENT-ORG",
        "ranges": [
            {"scheme": "CDHF", "project": "LQS-FS", "project_name": "Longquanshan city forest park carbon sink",
             "methodology": "forest_carbon_sink", "vintage": 2023, "lo": 1, "hi": 1001,
             "serial": "CDHF-LQS-FS-2023-0000000001-0000001000"},
            {"scheme": "CDHF", "project": "JCGW-FS", "project_name": "锦城绿道一期碳汇 <i>",
             "methodology": "energy_substitution", "vintage": 2022, "lo": 501, "hi": 701,
             "serial": "CDHF-JCGW-FS-2022-0000000501-0000000700"},
        ],
    }
    return cert | changes


def test_verification_url():
    assert URL == "https://carbonx.example/verify/CX-7KQ2-M9PD-XW4R"


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------


def test_html_shows_every_field():
    page = render_certificate_html(_cert(), URL)
    for text in [
        "碳中和证书", "Carbon Neutrality Certificate",
        "受益方", "Beneficiary", "成都绿色公益平台",
        "用途", "Purpose", "Launch event carbon neutrality 发布会碳中和 &amp; &lt;b&gt;friends&lt;/b&gt;",
        "1.200 t CO<sub>2</sub>e",
        "CDHF-LQS-FS-2023-0000000001-0000001000", "CDHF-JCGW-FS-2022-0000000501-0000000700",
        "Longquanshan city forest park carbon sink", "(LQS-FS)", "锦城绿道一期碳汇 &lt;i&gt;", "(JCGW-FS)",
        "森林碳汇", "Forest carbon sink", "能源替代", "Energy substitution",
        "<td>2023</td>", "<td>2022</td>", "1.000", "0.200",
        "2026-03-01 10:30 (UTC+8)", 'datetime="2026-03-01T02:30:00+00:00"',
        "验证码", "Verification code", f'<div class="code">{CODE}</div>',
        f'<a href="{URL}">{URL}</a>', "EVENT-ORG",
    ]:
        assert text in page, text


def test_html_escapes_user_input():
    page = render_certificate_html(_cert(), URL)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>friends" not in page and "<i>" not in page


def test_html_is_self_contained():
    page = render_certificate_html(_cert(), URL)
    lowered = page.lower()
    for needle in ("<script", "<link", "src=", "@import", "url(", "@font-face", "<img", "<iframe"):
        assert needle not in lowered, needle
    # The only address on the page is the verification URL (as the link and its text).
    assert lowered.count("http") == page.count(URL) == 2
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page


def test_html_accepts_iso_strings_and_naive_utc():
    a = render_certificate_html(_cert(created_at="2026-03-01T02:30:00Z"), URL)
    b = render_certificate_html(_cert(created_at=dt.datetime(2026, 3, 1, 2, 30)), URL)
    assert "2026-03-01 10:30 (UTC+8)" in a and "2026-03-01 10:30 (UTC+8)" in b


def test_html_qr_code_decodes_to_the_url():
    page = render_certificate_html(_cert(), URL)
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    assert _decode_qr(_svg_matrix(svg)) == URL


@pytest.mark.parametrize("url", [
    "https://carbonx.example/verify/CX-1",
    "http://localhost:8080/v1/verify/CX-AAAA-BBBB-CCCC?lang=zh&src=qr",
    "https://carbonx.example/" + "v" * 70,  # version 6: four interleaved blocks
])
def test_qr_svg_round_trips(url):
    assert _decode_qr(_svg_matrix(qr_svg(url))) == url


@pytest.mark.parametrize("url", ["javascript:alert(1)", "https://a b", 'https://x/"><script>', "", None,
                                 "ftp://example.com/x"])
def test_a_bad_verification_url_is_refused(url):
    with pytest.raises(CarbonxError) as e:
        render_certificate_html(_cert(), url)
    assert e.value.code == "invalid_url"


@pytest.mark.parametrize("changes", [
    {"quantity_kg": 1000},                                   # ranges add up to 1,200
    {"quantity_kg": 0},
    {"quantity_kg": "1200"},
    {"ranges": []},
    {"created_at": "yesterday"},
    {"ranges": [{"serial": "CDHF-X-2023-1-1"}]},
])
def test_a_record_that_would_print_a_wrong_certificate_is_refused(changes):
    with pytest.raises(CarbonxError) as e:
        render_certificate_html(_cert(**changes), URL)
    assert e.value.code == "invalid_certificate"
    with pytest.raises(CarbonxError):
        render_certificate_pdf(_cert(**changes), URL)


# ------------------------------------------------------------------------------------------------
# PDF
# ------------------------------------------------------------------------------------------------


def _pdf_strings(pdf: bytes) -> str:
    """The text shown by the uncompressed page streams (Tj strings), read as Latin-1 for the standard fonts
    and as UTF-16BE for the CID font (its UniGB-UCS2-H encoding)."""
    out = []
    for m in re.finditer(rb"\(((?:[^()\\]|\\.)*)\) Tj", pdf, re.S):
        raw = re.sub(rb"\\([0-7]{1,3}|.)", lambda e: bytes([int(e.group(1), 8)]) if e.group(1)[:1].isdigit()
                     else {b"n": b"\n", b"r": b"\r", b"t": b"\t"}.get(e.group(1), e.group(1)), m.group(1))
        out.append(raw.decode("latin-1"))
        if len(raw) % 2 == 0:
            out.append(raw.decode("utf-16-be", errors="replace"))
    return "\n".join(out)


def test_pdf_is_a_pdf_and_deterministic():
    pdf = render_certificate_pdf(_cert(), URL)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert render_certificate_pdf(_cert(), URL) == pdf


def test_pdf_carries_every_field():
    pdf = render_certificate_pdf(_cert(), URL, compress=False)
    assert b"/STSong-Light" in pdf and b"/UniGB-UCS2-H" in pdf  # the CJK font, so Chinese renders
    assert f"/URI ({URL})".encode() in pdf                       # the link to the verification page
    text = _pdf_strings(pdf)
    for s in [CODE, "碳中和证书", "Carbon Neutrality Certificate", "受益方", "Beneficiary",
              "成都绿色公益平台 <script>alert('x')</script>",          # shown as text, not swallowed as markup
              "Launch event carbon neutrality 发布会碳中和 & <b>friends</b>",
              "1.200 t CO", "CDHF-LQS-FS-2023-0000000001-0000001000", "CDHF-JCGW-FS-2022-0000000501-0000000700",
              "Longquanshan city forest park carbon sink", "锦城绿道一期碳汇 <i>", "2023", "2022", "1.000", "0.200",
              "2026-03-01 10:30 (UTC+8)", "EVENT-ORG", "验证码", "Verification code", URL]:
        assert s in text, s


def test_pdf_compression_changes_only_the_encoding():
    packed, plain = render_certificate_pdf(_cert(), URL), render_certificate_pdf(_cert(), URL, compress=False)
    assert len(packed) < len(plain) and CODE.encode() not in packed.split(b"stream", 1)[1][:200]


def test_pdf_qr_code_decodes_to_the_url():
    drawing = _qr_drawing(URL, 100.0)
    rects = [(r.x, r.y, r.width, r.height) for r in drawing.contents]
    module = min(h for _, _, _, h in rects)
    n = round(100.0 / module)
    dark = set()
    for x, y, w, _ in rects:
        row = round((100.0 - y) / module) - 1
        for col in range(round(x / module), round((x + w) / module)):
            dark.add((row, col))
    matrix = [[(r, c) in dark for c in range(4, n - 4)] for r in range(4, n - 4)]
    assert _decode_qr(matrix) == URL


def test_long_retirements_run_over_several_pages():
    ranges = [{"scheme": "CDHF", "project": "LQS-FS", "project_name": "Longquanshan", "methodology": "other",
               "vintage": 2023, "lo": 10 * i + 1, "hi": 10 * i + 6, "serial": f"CDHF-LQS-FS-2023-{i:010d}-{i:010d}"}
              for i in range(120)]
    pdf = render_certificate_pdf(_cert(quantity_kg=600, ranges=ranges), URL, compress=False)
    assert len(re.findall(rb"/Type /Page\b", pdf)) >= 3
    text = _pdf_strings(pdf)
    assert all(r["serial"] in text for r in ranges)


# ------------------------------------------------------------------------------------------------
# A small QR reader (versions 1-6, error correction level M, byte mode), written from ISO/IEC 18004 for these
# tests: it reads the format information, removes the mask, walks the codewords, de-interleaves the data blocks
# and parses the byte segment. No error correction is attempted: a rendered code has no errors.
# ------------------------------------------------------------------------------------------------


def _svg_matrix(svg: str) -> list[list[bool]]:
    """Dark modules from segno's SVG path (`M x y`, relative `m dx dy`, `h length`), quiet zone removed."""
    size = int(re.search(r'd="M0 0h(\d+)v', svg).group(1))
    path = re.search(r'class="qrline"[^>]*\bd="([^"]+)"', svg).group(1)
    x = y = 0.0
    dark = set()
    for cmd, a, b in re.findall(r"([Mmh])(-?[\d.]+)(?:\s+(-?[\d.]+))?", path):
        if cmd == "M":
            x, y = float(a), float(b)
        elif cmd == "m":
            x, y = x + float(a), y + float(b)
        else:
            for i in range(int(float(a))):
                dark.add((int(y), int(x) + i))
            x += float(a)
    return [[(r, c) in dark for c in range(4, size - 4)] for r in range(4, size - 4)]


_M_BLOCKS = {1: (16, 1), 2: (28, 1), 3: (44, 1), 4: (32, 2), 5: (43, 2), 6: (27, 4)}  # data codewords per block, blocks
_MASKS = [lambda r, c: (r + c) % 2 == 0, lambda r, c: r % 2 == 0, lambda r, c: c % 3 == 0,
          lambda r, c: (r + c) % 3 == 0, lambda r, c: (r // 2 + c // 3) % 2 == 0,
          lambda r, c: (r * c) % 2 + (r * c) % 3 == 0, lambda r, c: ((r * c) % 2 + (r * c) % 3) % 2 == 0,
          lambda r, c: ((r + c) % 2 + (r * c) % 3) % 2 == 0]


def _format_bits(ecl: int, mask: int) -> int:
    data = ecl << 3 | mask
    rem = data
    for _ in range(10):
        rem = (rem << 1) ^ ((rem >> 9) * 0x537)
    return (data << 10 | rem) ^ 0x5412


def _decode_qr(m: list[list[bool]]) -> str:
    n = len(m)
    version = (n - 17) // 4
    assert n == 17 + 4 * version and version in _M_BLOCKS, f"size {n}: only versions 1-6 are read here"
    # Format information, first copy (around the top-left finder).
    cells = [(i, 8) for i in range(6)] + [(7, 8), (8, 8), (8, 7)] + [(8, 14 - i) for i in range(9, 15)]
    read = sum(m[r][c] << i for i, (r, c) in enumerate(cells))
    [(ecl, mask)] = [(e, k) for e in range(4) for k in range(8) if _format_bits(e, k) == read]
    assert ecl == 0, "level M expected"  # format bits: L=1, M=0, Q=3, H=2
    # Function patterns: finders with separators and format areas, timing lines, one alignment pattern (v2-6).
    func = [[False] * n for _ in range(n)]
    for r in range(n):
        for c in range(n):
            if (r < 9 and c < 9) or (r < 9 and c >= n - 8) or (r >= n - 8 and c < 9) or r == 6 or c == 6:
                func[r][c] = True
    if version >= 2:
        a = 4 * version + 10
        for r in range(a - 2, a + 3):
            for c in range(a - 2, a + 3):
                func[r][c] = True
    # Codeword bits: two-column strips from the right, alternately upwards and downwards, skipping column 6.
    bits = []
    right = n - 1
    while right >= 1:
        if right == 6:
            right = 5
        upward = (right + 1) & 2 == 0
        for vert in range(n):
            r = n - 1 - vert if upward else vert
            for c in (right, right - 1):
                if not func[r][c]:
                    bits.append(m[r][c] ^ _MASKS[mask](r, c))
        right -= 2
    codewords = [int("".join("1" if b else "0" for b in bits[i:i + 8]), 2) for i in range(0, len(bits) - 7, 8)]
    per_block, blocks = _M_BLOCKS[version]
    data = [codewords[i * blocks + b] for b in range(blocks) for i in range(per_block)]
    stream = "".join(f"{x:08b}" for x in data)
    assert stream[:4] == "0100", "byte mode expected"
    length = int(stream[4:12], 2)
    payload = bytes(int(stream[12 + 8 * i: 20 + 8 * i], 2) for i in range(length))
    rest = stream[12 + 8 * length:]
    assert set(rest[:4]) <= {"0"}, "terminator expected after the segment"
    return payload.decode("utf-8")


def test_a_serial_too_long_for_its_column_breaks_only_after_hyphens():
    head = "CDHFXXXXXXXXXXXX-ABCDEFGHIJKL-MNOPQRSTUVWXYZ-ABCD-2023"
    r = {"scheme": "CDHFXXXXXXXXXXXX", "project": "ABCDEFGHIJKL-MNOPQRSTUVWXYZ-ABCD", "project_name": "Long",
         "methodology": "other", "vintage": 2023, "lo": 1, "hi": 1201, "serial": f"{head}-0000000001-0000001200"}
    text = _pdf_strings(render_certificate_pdf(_cert(ranges=[r]), URL, compress=False))
    lines = [line for line in text.splitlines() if line.isascii()]  # drop the UTF-16 readings of Latin strings
    start = next(i for i, line in enumerate(lines) if line.startswith("CDHFXXXXXXXXXXXX-"))
    shown = lines[start:start + 3]
    # Broken only after hyphens, the unit numbers together on the last line, and no character lost.
    assert shown[0].endswith("-") and shown[1].endswith("0000000001-0000001200")
    assert shown[0] + shown[1] == r["serial"]


@pytest.mark.parametrize("name", ["한국전력공사 (KEPCO)", "Søren Ærø, Łódź", "Muñoz Straße Åsa", "Ελληνικά · Жук",
                                  "成都绿色公益平台 Chengdu", "Đà Nẵng xanh 2026"])
def test_the_pdf_prints_a_beneficiary_in_any_script_as_it_was_given(name):
    """Read back as a PDF reader does (pdfminer.six, through each font's own encoding): every
    letter of the beneficiary, the project name and the purpose is there. In STSong-Light alone,
    letters outside GBK (ø, Ł, ß, Hangul) printed as nothing (review30)."""
    from pdfminer.high_level import extract_text

    ranges = [_cert()["ranges"][0] | {"project_name": f"{name} park"}]
    pdf = render_certificate_pdf(_cert(beneficiary=name, purpose=f"Offset for {name}", ranges=ranges, quantity_kg=1000),
                                 URL)
    text = "".join(extract_text(io.BytesIO(pdf)).split())
    for shown in (name, f"Offsetfor{name}", f"{name}park"):
        assert "".join(shown.split()) in text, (shown, text[:400])


def test_each_character_goes_to_a_font_whose_encoding_maps_it():
    """The CID fonts are not embedded: a character their encoding (CMap) does not map prints as
    nothing. Every character of the Basic Multilingual Plane sent to STSong-Light or to the Korean
    font is mapped by that font's CMap; the rest go to the embedded DejaVu Sans."""
    from pdfminer.cmapdb import CMapDB

    cmaps = {_CJK: CMapDB.get_cmap("UniGB-UCS2-H"), _KOREAN: CMapDB.get_cmap("UniKS-UCS2-H")}
    unmapped = []
    for cp in range(0x20, 0x10000):
        if 0xD800 <= cp < 0xE000:
            continue
        font = _font_for(chr(cp))
        if font in cmaps and list(cmaps[font].decode(cp.to_bytes(2, "big"))) in ([], [0]):
            unmapped.append((hex(cp), font))
    assert unmapped == []
    assert {_font_for(c) for c in "한국"} == {_KOREAN} and {_font_for(c) for c in "øŁßĐ"} == {_OTHER}
