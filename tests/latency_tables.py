"""A latency table's entries by their definition: the reference the latency tests check
``jaxprune.latency.LatencyTable.at`` and the selectors against."""


def entry_ms_slow(e, picks):
  """One entry's time at candidate ``picks[s]`` of every group, times its scaled
  factors' kept fractions."""
  i = 0 if e.in_group is None else picks[e.in_group]
  j = 0 if e.out_group is None else picks[e.out_group]
  value = float(e.ms[i, j])
  for f in e.scaled:
    value *= f.const + sum(float(m[picks[s]]) for s, m in f.terms)
  return value
