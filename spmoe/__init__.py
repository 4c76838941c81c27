"""
spmoe: MoE inference with expert offloading and speculative decoding (SP-MoE and baselines).

Glossary (used in names, records and summaries):
- ExpertKey = (layer, expert): a routed expert of one decoder layer of the target.
- store: every expert in (pinned) host memory; cache: the device slots; slot: one expert's buffer.
- hit / prefetch hit / late prefetch / miss: an expert resident before needed / brought by a
  prefetch in time / brought by a prefetch still in flight (waited: stall) / loaded on demand.
- draft / accepted / recovered / bonus: drafted tokens, the accepted prefix, the token resampled
  at the first rejection, the extra target token after full acceptance.
- step: one engine iteration (prefill, or draft -> verify -> accept); TPOT excludes prefill.
Layout: `engine` (the one decode loop), `strategy` (method registry), `offload/`, `spec/`,
`predict/`, `policy/`, `models/`, `trace/`, `data/`; methods live in the top-level `baselines/`.
"""
