# Sourced by the next*.sh device calls (docs/gpu.md): installs the wheels carried in .whl/ (built as docs/gpu.md says;
# pass carry: [".whl"]), defines run NAME LIMIT_S ARGS... (one `python run.py` job into /tmp/runs/NAME, with
# experiment.time_limit_s=LIMIT_S, its log in /tmp/runs/NAME.log) and pack (every run dir into $OUT/runs.tgz).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/runs
run() {
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s)
  python run.py "$@" experiment.time_limit_s=$lim hydra.run.dir=/tmp/runs/$name > /tmp/runs/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "TPOT|Error|error" /tmp/runs/$name.log | grep -v "^{" | tail -15
}
pack() { tar czf $OUT/runs.tgz -C /tmp/runs . ; }
