#!/usr/bin/env python3
"""Generate tests/fixtures/jcs_vectors.json: RFC 8785 (JCS) test vectors.

The canonical forms come from an independent implementation, the PyPI package
`rfc8785` (pure Python, by Trail of Bits). It is NOT a runtime or test
dependency: the generated JSON is committed, and this script is only rerun to
add vectors. To regenerate:

    python3 -m venv /tmp/jcs-venv
    /tmp/jcs-venv/bin/pip install rfc8785==0.1.4
    /tmp/jcs-venv/bin/python scripts/gen_jcs_fixtures.py

Each vector is {"name", "input", "canonical", "sha256"}:
  input      JSON text; json.loads(input) is exactly the value canonicalised
  canonical  rfc8785.dumps(json.loads(input)), decoded as UTF-8
  sha256     lower-hex SHA-256 of the canonical UTF-8 bytes

Number cases use float syntax (a '.' or an exponent) so Python parses them as
doubles: rfc8785 refuses Python ints outside +-(2**53-1), while a JSON number
is a double. The RFC's own examples and the Appendix B table are also checked
against the expected output printed in the RFC, so the fixture file does not
rest on rfc8785 alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import rfc8785

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "jcs_vectors.json"

# (name, input JSON text, expected canonical text as printed in RFC 8785, or None)
VECTORS: list[tuple[str, str, str | None]] = []


def add(name: str, text: str, expected: str | None = None) -> None:
    VECTORS.append((name, text, expected))


# --- RFC 8785 section 3.2.2 example (numbers, literals, string escapes) -----
add(
    "rfc8785_3.2.2_example",
    '{\n'
    '  "numbers": [333333333.33333329, 1E30, 4.50,\n'
    '              2e-3, 0.000000000000000000000000001],\n'
    '  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
    '  "literals": [null, true, false]\n'
    '}\n',
    '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
    '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}',
)

# --- RFC 8785 section 3.2.3 example (sorting of object properties) ----------
add(
    "rfc8785_3.2.3_sorting",
    '{\n'
    '  "\\u20ac": "Euro Sign",\n'
    '  "\\r": "Carriage Return",\n'
    '  "\\ufb33": "Hebrew Letter Dalet With Dagesh",\n'
    '  "1": "One",\n'
    '  "\\ud83d\\ude00": "Emoji: Grinning Face",\n'
    '  "\\u0080": "Control",\n'
    '  "\\u00f6": "Latin Small Letter O With Diaeresis"\n'
    '}\n',
    '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
    '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
    '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
)

# --- RFC 8785 Appendix B: IEEE-754 double -> JSON number (finite values) ----
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),  # minus zero
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def f64(hexbits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(hexbits))[0]


for hexbits, expected in APPENDIX_B:
    # repr() is the shortest round-trip form and always has '.' or 'e',
    # so json.loads gives back exactly this double.
    add(f"appendix_b_{hexbits}", repr(f64(hexbits)), expected)

add(
    "appendix_b_all_in_array",
    "[" + ", ".join(repr(f64(h)) for h, _ in APPENDIX_B) + "]",
    "[" + ",".join(e for _, e in APPENDIX_B) + "]",
)

# --- more number formatting (ECMAScript Number.prototype.toString rules) ----
for name, text, expected in [
    ("num_minus_zero_int_syntax", "-0", "0"),
    ("num_minus_zero_float", "-0.0", "0"),
    ("num_zero_exp", "0e10", "0"),
    ("num_1e21", "1e21", "1e+21"),
    ("num_1e20", "1e20", "100000000000000000000"),
    ("num_1e-7", "1e-7", "1e-7"),
    ("num_1e-6", "1e-6", "0.000001"),
    ("num_0.000001", "0.000001", "0.000001"),
    ("num_1e+30", "1e+30", "1e+30"),
    ("num_4.50", "4.50", "4.5"),
    ("num_2e-3", "2e-3", "0.002"),
    ("num_1.0", "1.0", "1"),
    ("num_100.0E-2", "100.0E-2", "1"),
    ("num_-1.5", "-1.5", "-1.5"),
    ("num_0.1", "0.1", "0.1"),
    ("num_0.1_plus_0.2", repr(0.1 + 0.2), "0.30000000000000004"),
    ("num_123456789012345680000", "123456789012345680000.0", "123456789012345680000"),
    ("num_1.2345678901234568e21", "1.2345678901234568e21", "1.2345678901234568e+21"),
    ("num_2^53_float", "9007199254740992.0", "9007199254740992"),
    ("num_2^53_minus1_int", "9007199254740991", "9007199254740991"),
    ("num_neg_2^53_minus1_int", "-9007199254740991", "-9007199254740991"),
    ("num_1e15_int_like", "1e15", "1000000000000000"),
    ("num_large_int_like_float", "4.294967296e9", "4294967296"),
    ("num_1.5e300", "1.5e300", "1.5e+300"),
    ("num_tiny", "1.2e-300", "1.2e-300"),
    ("num_min_normal", "2.2250738585072014e-308", "2.2250738585072014e-308"),
    ("num_pi", "3.141592653589793", "3.141592653589793"),
]:
    add(name, text, expected)

# --- literals, empties, structure -------------------------------------------
add("literal_null", "null", "null")
add("literal_true", " true ", "true")
add("literal_false", "false", "false")
add("empty_object", "{ }", "{}")
add("empty_array", "[ ]", "[]")
add("empty_string", '""', '""')
add("empty_key", '{"": 1, "a": ""}', '{"":1,"a":""}')
add(
    "whitespace_removed",
    ' {\n\t"b" : [ 1 , 2 ,\r\n 3 ] ,\n "a" : { } } ',
    '{"a":{},"b":[1,2,3]}',
)
add(
    "nested_objects_sorted_each_level",
    '{"z": {"b": 2, "a": 1, "c": {"y": null, "x": [3, {"k2": true, "k1": false}]}}, "a": []}',
    '{"a":[],"z":{"a":1,"b":2,"c":{"x":[3,{"k1":false,"k2":true}],"y":null}}}',
)
add(
    "arrays_keep_order",
    '[3, 1, 2, "b", "a", [2, 1], {"b": 1, "a": 2}]',
    '[3,1,2,"b","a",[2,1],{"a":2,"b":1}]',
)
add(
    "nested_empty_containers",
    '{"a": [[], {}, [[]], [{}], {"x": {}}]}',
    '{"a":[[],{},[[]],[{}],{"x":{}}]}',
)
deep = 64
add("deep_nesting_arrays_64", "[" * deep + "1" + "]" * deep, "[" * deep + "1" + "]" * deep)
add(
    "deep_nesting_objects_32",
    "".join(f'{{"k{i}": 0, "n": ' for i in range(32)) + "null" + "}" * 32,
    None,
)
add(
    "key_order_utf16_not_codepoint",
    # U+FF61 sorts after U+1F600 by code point but before it in UTF-16
    # (0xFF61 > 0xD83D), so JCS order is emoji first.
    '{"\\uff61": 1, "\\ud83d\\ude00": 2, "\\u00e9": 3, "e": 4, "E": 5, "aa": 6, "a": 7}',
    '{"E":5,"a":7,"aa":6,"e":4,"\u00e9":3,"\U0001f600":2,"\uff61":1}',
)
add("keys_prefix_order", '{"ab": 1, "a": 2, "abc": 3, "b": 4}', '{"a":2,"ab":1,"abc":3,"b":4}')

# --- strings -----------------------------------------------------------------
add(
    "string_all_control_chars",
    json.dumps("".join(chr(c) for c in range(0x20))),
    '"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r'
    '\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018'
    '\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f"',
)
add("string_quote_backslash", r'"say \"hi\" \\ C:\\path"', r'"say \"hi\" \\ C:\\path"')
add("string_solidus_not_escaped", r'"a/b\/c</script>"', '"a/b/c</script>"')
add("string_del_and_c1_not_escaped", r'"\u007f\u0085\u009f"', '"\u007f\u0085\u009f"')
add(
    "string_non_ascii_escaped_input",
    r'"\u00e5\u00e4\u00f6 \u00fc\u00df \u65e5\u672c\u8a9e \u0416 \u03a9"',
    '"\u00e5\u00e4\u00f6 \u00fc\u00df \u65e5\u672c\u8a9e \u0416 \u03a9"',
)
add("string_non_ascii_raw_input", '"\u00e5\u00e4\u00f6 \u65e5\u672c\u8a9e \u20ac"', '"\u00e5\u00e4\u00f6 \u65e5\u672c\u8a9e \u20ac"')
add(
    "string_emoji_surrogate_pairs",
    r'["\ud83d\ude00", "\ud83e\udd16\u2699\ufe0f", "\ud800\udc00", "\udbff\udfff"]',
    '["\U0001f600","\U0001f916\u2699\ufe0f","\U00010000","\U0010ffff"]',
)
add("string_emoji_raw_input", '{"tool": "\U0001f6e0\ufe0f", "ok": "\u2705"}', '{"ok":"\u2705","tool":"\U0001f6e0\ufe0f"}')
add(
    "string_escapes_short_forms",
    r'"\b\f\n\r\t\u0008\u000C\u000A\u000D\u0009"',
    r'"\b\f\n\r\t\b\f\n\r\t"',
)
add("string_uppercase_hex_escape_input", r'"\u00C4\u001F\u001f"', '"\u00c4\\u001f\\u001f"')
add("string_bmp_edge", r'"\uffff\ufffd\ue000"', '"\uffff\ufffd\ue000"')
add(
    "keys_need_escaping",
    r'{"tab\tkey": 1, "quote\"key": 2, "nl\nkey": 3, "\u0000": 4}',
    r'{"\u0000":4,"nl\nkey":3,"quote\"key":2,"tab\tkey":1}',
)

# --- realistic CNC run-like records -----------------------------------------
add(
    "cnc_cam_decision_green",
    '{"mode":"cam","tool_id":"T102","decision":{"risk_level":"GREEN","score":87.5,"warnings":[]}}',
    '{"decision":{"risk_level":"GREEN","score":87.5,"warnings":[]},"mode":"cam","tool_id":"T102"}',
)
add(
    "cnc_feeds_speeds_yellow",
    json.dumps(
        {
            "run_id": "run_01J9Z6ZQ3W8K4T2M5N7P",
            "mode": "feeds_speeds",
            "machine": {"id": "haas-vf2", "controller": "NGC", "max_rpm": 8100},
            "tool_id": "T7",
            "tool": {"diameter_mm": 6.0, "flutes": 3, "material": "carbide", "stickout_mm": 24.5},
            "material": "6061-T6 aluminium",
            "params": {"rpm": 8000, "feed_mm_min": 1920.0, "doc_mm": 1.5, "woc_mm": 0.6},
            "decision": {
                "risk_level": "YELLOW",
                "score": 61.25,
                "warnings": ["chipload near max for 3-flute", "stickout/diameter > 4"],
            },
            "created_at": "2025-03-14T09:26:53.589Z",
        },
        indent=2,
    ),
)
add(
    "cnc_gcode_sim_red",
    json.dumps(
        {
            "mode": "gcode_sim",
            "program": {"name": "O1001 bracket \u2013 op2", "lines": 4213, "sha256": "9f" * 32},
            "decision": {
                "risk_level": "RED",
                "score": 12.0,
                "warnings": [
                    "rapid move below clearance plane at N1340 (Z-0.2)",
                    "tool T3 not in tool table",
                ],
                "blocking": True,
            },
            "bounds_mm": {"x": [-0.5, 152.4], "y": [0.0, 76.2], "z": [-12.7, 25.0]},
            "cycle_time_s": 1843.7,
            "notes": None,
        },
        ensure_ascii=False,
    ),
)
add(
    "cnc_run_with_events",
    json.dumps(
        {
            "schema": "rmos.run/v1",
            "run_id": "r-000042",
            "parent_run_id": None,
            "events": [
                {"seq": 1, "kind": "created", "at": "2025-01-02T03:04:05Z"},
                {"seq": 2, "kind": "approved", "by": "op\u00e9rateur", "at": "2025-01-02T03:10:00Z"},
                {"seq": 3, "kind": "completed", "at": "2025-01-02T04:00:00Z", "metrics": {"mrr_cm3_min": 14.4, "spindle_load_pct": 37.5e0}},
            ],
            "tags": ["aluminium", "prototype", "2D-contour"],
            "override": {"feed_pct": 100, "spindle_pct": 95},
        },
        separators=(",", ":"),
    ),
)
add(
    "cnc_score_number_forms",
    '{"decision":{"score":1.0E2,"confidence":0.950,"delta":-0.0,"threshold":75}}',
    '{"decision":{"confidence":0.95,"delta":0,"score":100,"threshold":75}}',
)


def main() -> int:
    names = [n for n, _, _ in VECTORS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        print(f"duplicate vector names: {sorted(dupes)}", file=sys.stderr)
        return 1

    out = []
    failures = 0
    for name, text, expected in VECTORS:
        value = json.loads(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{name}: non-finite number")
        canonical_bytes = rfc8785.dumps(value)
        canonical = canonical_bytes.decode("utf-8")
        if expected is not None and canonical != expected:
            failures += 1
            print(f"MISMATCH {name}:\n  rfc8785:  {canonical!r}\n  expected: {expected!r}", file=sys.stderr)
        # The canonical form must itself be valid JSON denoting the same value,
        # and be a fixed point of canonicalisation (its numbers read as doubles,
        # since e.g. "9007199254740992" is an int to Python).
        reparsed = json.loads(canonical, parse_int=float)
        if reparsed != value or rfc8785.dumps(reparsed) != canonical_bytes:
            failures += 1
            print(f"NOT A FIXED POINT {name}: {canonical!r}", file=sys.stderr)
        out.append(
            {
                "name": name,
                "input": text,
                "canonical": canonical,
                "sha256": hashlib.sha256(canonical_bytes).hexdigest(),
            }
        )
    if failures:
        print(f"{failures} check(s) failed; not writing {OUT}", file=sys.stderr)
        return 1

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(out)} vectors to {OUT.relative_to(ROOT)} (rfc8785 {rfc8785.__version__ if hasattr(rfc8785, '__version__') else '?'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
