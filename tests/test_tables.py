"""ttq_jax.tables: a generated table's README block is read and replaced between its markers, nothing else moves."""

from ttq_jax import tables

README = 'intro\n<!-- t:start -->\nold | table\n<!-- t:end -->\nafter\n'


def test_readme_block_is_read_and_replaced_between_its_markers():
  assert tables.markers('t') == ('<!-- t:start -->', '<!-- t:end -->')
  assert tables.readme_block(README, 't') == 'old | table'
  new = tables.with_readme_block(README, 't', '| new |\n')
  assert new == 'intro\n<!-- t:start -->\n| new |\n<!-- t:end -->\nafter\n'
  assert tables.readme_block(new, 't') == '| new |'


def test_run_or_reuse_rereads_a_finished_run_and_collect_only_skips_an_unfinished_one(tmp_path):
  import json
  import sys
  import pytest
  done = tmp_path / 'done'
  done.mkdir()
  (done / 'result.json').write_text(json.dumps({'step': 7}))
  lines = []
  # a finished run is re-read, not trained again (the command would fail)
  assert tables.run_or_reuse(str(done), command=[sys.executable, '-c', 'raise SystemExit(3)'], log=lines.append) == {'step': 7}
  assert tables.run_or_reuse(str(tmp_path / 'todo'), collect_only=True) is None and not lines
  with pytest.raises(ValueError, match='config= .* or command='):
    tables.run_or_reuse(str(tmp_path / 'todo'))
  with pytest.raises(RuntimeError, match=r"^row a: exit 1: boom \(log: .*todo/run.log\)"):
    tables.run_or_reuse(str(tmp_path / 'todo'), command=[sys.executable, '-c', "raise SystemExit('boom')"],
                        label='row a', log=lines.append)
  assert lines == [f'[run ] row a in {tmp_path / "todo"}']


def test_paired_tests_leave_out_absent_rows_and_holm_over_the_rest():
  by_seed = {'a': {0: 1.0, 1: 2.0, 2: 4.0}, 'b': {0: 0.0, 1: 0.5, 2: 1.0}, 'c': {0: 1.0, 1: 1.0, 2: 2.0}}
  tests = tables.paired_tests(by_seed, [('a', 'b'), ('a', 'missing'), ('c', 'b')])
  assert [(t['a'], t['b']) for t in tests] == [('a', 'b'), ('c', 'b')]
  ps = sorted(t['p'] for t in tests)  # Holm over two: the smaller p doubled, the larger kept (monotone)
  assert sorted(t['p_holm'] for t in tests) == [2 * ps[0], max(2 * ps[0], ps[1])]
  assert tests[0]['mean'] == (1.0 + 1.5 + 3.0) / 3
