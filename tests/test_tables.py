"""ttq_jax.tables: a generated table's README block is read and replaced between its markers, nothing else moves."""

from ttq_jax import tables

README = 'intro\n<!-- t:start -->\nold | table\n<!-- t:end -->\nafter\n'


def test_readme_block_is_read_and_replaced_between_its_markers():
  assert tables.markers('t') == ('<!-- t:start -->', '<!-- t:end -->')
  assert tables.readme_block(README, 't') == 'old | table'
  new = tables.with_readme_block(README, 't', '| new |\n')
  assert new == 'intro\n<!-- t:start -->\n| new |\n<!-- t:end -->\nafter\n'
  assert tables.readme_block(new, 't') == '| new |'
