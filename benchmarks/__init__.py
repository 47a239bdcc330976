"""Benchmarks of the engine and the server. Each script in this folder states its own command in
its docstring and writes ``benchmarks/results/<name>.json`` (+ ``.png``) through
:func:`benchmarks.cli.write_result`; the pieces they share are ``cli`` (options, environment,
JSON), ``glue`` (inputs), ``models`` (models and deltas), ``timing`` (measuring, statistics,
FLOPs), ``plotting`` (figures) and ``live`` (a real server process for the HTTP benchmarks).

Run them as ``OMP_WAIT_POLICY=PASSIVE python -m benchmarks.<name>`` on a machine shared with other
work: libgomp's default spin-waiting makes each of a forward's ~100 parallel ops wait for a thread
the OS has descheduled (MiniLM 32x32 tokens, 2 threads, load 13 on 2 cores: 315 ms median per
forward spinning vs 2.3 ms passive). The value is recorded with the command.

Fairness rules every script follows:
* all variants of one comparison run in one process, interleaved round-robin (the order rotates
  each repetition), on identical pre-tokenized batches, same dtype, same thread count;
* tokenization and padding are done before timing for every variant (the engine's and HF's
  forwards are what is compared); the HTTP benchmarks measure the whole path instead;
* medians over repetitions, ratios computed from medians of the same run.
"""
