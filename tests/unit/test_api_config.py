"""POST /v2/config: a posted config the daemon refuses is the body's fault, whatever refused it (the parser, or the
model while applying it): a 400 carrying FILE:LINE, and nothing applied."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from hdslb.api.app import make_app
from tests.unit.test_api import CONF, expect
from tests.unit.test_api_security import BASE, daemon  # noqa: F401 (daemon: the fixture, a harness daemon over BASE)


@pytest.fixture
async def api(daemon):  # noqa: F811
    async with TestClient(TestServer(make_app(daemon))) as c:
        yield daemon, c


def dests(d):
    return {(str(x.addr), x.port): (x.weight, x.fwd, x.l_threshold) for s in d.bal.services.values()
            for x in s.dests.values()}


@pytest.mark.parametrize("old,new,line", [
    # the model refuses a lower threshold without an upper one (ERANGE): it was a 500 "internal" error
    ("weight 3", "weight 4\n        lthreshold 20", "<posted config>:7:1"),
    # a local address on an interface hdslbd does not run on (ENODEV): it was a 404, as if /v2/config were missing
    ("192.168.100.200 eth1", "192.168.100.200 eth7", "<posted config>:7:1"),
])
async def test_a_posted_config_the_model_refuses_is_400_and_applies_nothing(api, old, new, line):
    d, c = api
    before, text = dests(d), d.config_text()
    b = await expect(await c.post("/v2/config", data=BASE.replace(old, new), headers=CONF), 400)
    assert b["error"].startswith(line) and "nothing was applied" in b["error"]
    assert dests(d) == before and d.config_text() == text


async def test_get_shows_the_text_that_runs_not_the_file_a_reload_refused(api):
    """GET /v2/config (config.get) is the running configuration. It read the file again on every call, so after a
    reload the file's new text failed (a typo, kept out: the old config runs on) it showed the refused text as the
    one running, and an edit not reloaded yet as well. It shows the text the running config was read from, until a
    reload of the file succeeds."""
    from hdslb.errors import HdslbError

    d, c = api
    conf = d.settings.config_file
    with open(conf, "w") as f:
        f.write(BASE.replace("weight 3", "weight 3x"))
    with pytest.raises(HdslbError, match="nothing was applied"):
        await d.reload_config()
    r = await c.get("/v2/config")
    assert r.status == 200 and r.headers["X-Hdslb-Config-Source"] == "file"
    assert await r.text() == BASE and d.config_text() == BASE
    with open(conf, "w") as f:  # edited, not reloaded yet: the old text still runs
        f.write(BASE.replace("weight 3", "weight 5"))
    assert await (await c.get("/v2/config")).text() == BASE
    await d.reload_config()
    assert dests(d)[("192.168.100.2", 80)][0] == 5
    assert await (await c.get("/v2/config")).text() == BASE.replace("weight 3", "weight 5")
