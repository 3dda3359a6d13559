"""The wrk wrapper: its parser on recorded wrk runs, and one real run against cydispatch."""

from __future__ import annotations

import json
import shutil

import pytest

from cydispatch.bench import wrk

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None,
                               reason="wrk is not installed (apt-get install -y wrk)")

# Whole stdout of real runs against `cydispatch serve --workers 2`, each from
# the command line in its comment (URL http://127.0.0.1:8300/).

# -t 1 -c 4 -d 1s -s wrk.lua URL --
KEEPALIVE_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8300/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    51.58us   94.99us   3.34ms   96.28%
    Req/Sec    72.08k    13.58k   82.28k    72.73%
  78813 requests in 1.10s, 12.03MB read
Requests/sec:  71660.76
Transfer/sec:     10.93MB
CYDISPATCH_WRK_JSON {"bytes":12610080,"duration_us":1099807,"errors":{"connect":0,"read":0,"status":0,"timeout":0,"write":0},"latency_us":{"max":3339,"mean":51.581276382629,"p50":38,"p90":81,"p99":279,"p99_9":1486,"stdev":94.986217581245},"requests":78813,"workers":{}}
"""  # noqa: E501

# -t 2 -c 4 -d 1s -s wrk.lua URL -- close=1 slow_every=10 'slow_path=/slow?ms=20'
CLOSE_SLOW_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8300/
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.67ms   17.60ms 115.55ms   89.75%
    Req/Sec   359.75    143.34   600.00     65.00%
  717 requests in 1.00s, 126.70KB read
Requests/sec:    715.67
Transfer/sec:    126.47KB
CYDISPATCH_WRK_JSON {"bytes":129743,"duration_us":1001856,"errors":{"connect":0,"read":0,"status":0,"timeout":0,"write":0},"latency_us":{"max":115551,"mean":11674.833333333,"p50":6508,"p90":29474,"p99":89489,"p99_9":109955,"stdev":17600.822808848},"requests":717,"workers":{}}
"""  # noqa: E501

# -t 2 -c 4 -d 1s -s wrk.lua URL -- slow_every=20 slow_path=/missing count_workers=1
# One request in 20 gets a 404, which wrk counts as a status error and whose
# body names no worker.
COUNT_WORKERS_OUTPUT = """\
Running 1s test @ http://127.0.0.1:8300/
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   129.23us    1.20ms  27.52ms   99.35%
    Req/Sec    43.59k    19.17k   79.90k    77.27%
  95206 requests in 1.10s, 14.50MB read
  Non-2xx or 3xx responses: 4759
Requests/sec:  86596.96
Transfer/sec:     13.19MB
CYDISPATCH_WRK_JSON {"bytes":15204406,"duration_us":1099415,"errors":{"connect":0,"read":0,"status":4759,"timeout":0,"write":0},"latency_us":{"max":27518,"mean":129.22534360224,"p50":34,"p90":87,"p99":468,"p99_9":22734,"stdev":1202.3303644963},"requests":95206,"workers":{"10210":35628,"10211":54819}}
"""  # noqa: E501

RECORDED = [KEEPALIVE_OUTPUT, CLOSE_SLOW_OUTPUT, COUNT_WORKERS_OUTPUT]


def test_parse_keepalive_run():
    result = wrk.parse(KEEPALIVE_OUTPUT)
    assert result.requests == 78813
    assert result.duration == pytest.approx(1.099807)
    assert result.rps == pytest.approx(71660.76, abs=0.01)  # wrk's own "Requests/sec"
    assert result.bytes == 12610080
    assert result.latency_p50_us == 38.0
    assert result.latency_max_us == 3339.0
    assert result.latency_mean_us == pytest.approx(51.58, abs=0.01)  # wrk's "Avg 51.58us"
    assert result.errors == 0
    assert result.workers == {}


def test_parse_close_slow_run():
    result = wrk.parse(CLOSE_SLOW_OUTPUT)
    assert result.requests == 717
    assert result.rps == pytest.approx(715.67, abs=0.01)
    assert result.latency_p50_us == 6508.0
    assert result.latency_max_us == 115551.0
    assert result.errors == 0
    assert result.workers == {}


def test_parse_counted_workers_and_status_errors():
    result = wrk.parse(COUNT_WORKERS_OUTPUT)
    assert result.requests == 95206
    assert result.errors_status == 4759  # wrk's "Non-2xx or 3xx responses"
    assert result.errors == result.errors_status
    assert result.workers == {10210: 35628, 10211: 54819}
    # Every successful response named its worker; the 404s named none.
    assert sum(result.workers.values()) == result.requests - result.errors_status


@pytest.mark.parametrize("output", RECORDED, ids=["keepalive", "close-slow", "count-workers"])
def test_parse_gives_typed_consistent_fields(output):
    result = wrk.parse(output)
    assert result.rps == pytest.approx(result.requests / result.duration)
    latencies = [result.latency_p50_us, result.latency_p90_us, result.latency_p99_us,
                 result.latency_p999_us, result.latency_max_us]
    assert latencies == sorted(latencies)
    assert all(isinstance(value, float) for value in latencies)
    assert isinstance(result.requests, int) and isinstance(result.bytes, int)
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["requests"] == result.requests
    assert as_json["errors"] == result.errors


def test_output_without_result_line_is_an_error():
    output = KEEPALIVE_OUTPUT.replace(wrk.MARKER, "")
    with pytest.raises(wrk.WrkOutputError, match="Requests/sec"):
        wrk.parse(output)


def test_missing_binary_says_how_to_install():
    with pytest.raises(wrk.WrkNotFound, match="apt-get install -y wrk"):
        wrk.run("http://127.0.0.1:9/", connections=1, duration=1, wrk="/nonexistent/wrk")


def test_command_puts_workload_options_after_the_separator():
    argv = wrk.command("http://127.0.0.1:8000/", connections=8, threads=2, duration=5,
                       close=True, slow_every=100, count_workers=True, timeout=2)
    separator = argv.index("--")
    assert argv[separator - 1] == "http://127.0.0.1:8000/"
    assert argv[separator + 1:] == ["close=1", "slow_every=100", "slow_path=/slow?ms=20",
                                    "count_workers=1"]
    assert argv[argv.index("-d") + 1] == "5s"
    assert argv[argv.index("--timeout") + 1] == "2s"
    assert argv[argv.index("-s") + 1] == str(wrk.SCRIPT)
    assert wrk.SCRIPT.is_file()


def test_command_rejects_what_wrk_would_reject():
    with pytest.raises(ValueError, match="whole seconds"):
        wrk.command("http://127.0.0.1:8000/", connections=1, duration=1.5)
    with pytest.raises(ValueError, match="threads <= connections"):
        wrk.command("http://127.0.0.1:8000/", connections=1, threads=2, duration=1)


@needs_wrk
def test_run_counts_responses_of_the_real_workers(start_server):
    server = start_server(workers=2)
    result = wrk.run(f"http://{server.host}:{server.port}/", connections=4, threads=2,
                     duration=1, close=True, count_workers=True)
    assert result.requests > 0
    assert result.errors == 0
    assert set(result.workers) <= set(server.started_workers())
    assert sum(result.workers.values()) == result.requests
