"""Numbers in hdslb.conf are ASCII digits: "٣" (Arabic-Indic three) and "８０" (full-width) are refused with the
line, as they are in keepalived (strtoul) and DPVS."""

import pytest

from hdslb.config import ConfigError, loads

VS = "virtual_server 10.0.0.1 {port} {{\n lb_kind FNAT\n {body}\n real_server 10.1.0.1 80 {{\n  weight {weight}\n }}\n}}\n"


@pytest.mark.parametrize("port,body,weight,line", [
    ("80", "", "٣", 5),
    ("٨٠", "", "2", 1),
    ("８０", "", "2", 1),
    ("80", "persistence_timeout 10\n persistence_granularity ٢٤", "2", 4),
    ("80", "HTTP_GET", "2", 0),
])
def test_non_ascii_digits_are_refused(port, body, weight, line):
    if body == "HTTP_GET":
        text = VS.format(port=port, body="", weight=weight).replace(
            "  weight 2\n", "  weight 2\n  HTTP_GET {\n   url {\n    path /\n    status_code ٢٠٠\n   }\n  }\n")
        line = 9
    else:
        text = VS.format(port=port, body=body, weight=weight)
    with pytest.raises(ConfigError) as e:
        loads(text, name="t.conf")
    assert e.value.line == line, str(e.value)


def test_ascii_digits_still_load():
    cfg = loads(VS.format(port="80", body="persistence_timeout 10\n persistence_granularity 24", weight="3"))
    vs = cfg.virtual_servers[0]
    assert (vs.port, vs.persistence_granularity, vs.real_servers[0].weight) == (80, 24, 3)


def test_a_vsg_range_end_in_other_digits_is_refused():
    with pytest.raises(ConfigError):
        loads("virtual_server_group g {\n 10.0.0.1-٣ 80\n}\n")


def test_a_byte_order_mark_is_not_part_of_the_first_keyword(tmp_path):
    """Editors on other systems save UTF-8 with a BOM: it was read as part of the first keyword ("unknown keyword
    … did you mean global_defs?"). It is skipped, in a file and in posted text; one later in the text is still junk."""
    from hdslb.config import load

    text = VS.format(port="80", body="", weight="2")
    f = tmp_path / "bom.conf"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load(str(f)) == loads(text, name=str(f))
    assert loads("\ufeff" + text, name="t.conf") == loads(text, name="t.conf")
    with pytest.raises(ConfigError) as e:
        loads(text + "\ufeffglobal_defs {\n}\n", name="t.conf")
    assert e.value.line == 8
