set -x
ARGS="--rounds 3 --duration 5 --modes dispatch/least-conn reuseport shared --workloads close skew"
for i in 1 2; do
  /tmp/venv-old/bin/cydispatch bench $ARGS --out /tmp/then/skew/old-$i > /tmp/then/skew/old-$i.log 2>&1
  /work/venv/bin/cydispatch bench $ARGS --out /tmp/then/skew/now-$i > /tmp/then/skew/now-$i.log 2>&1
done
echo done > /tmp/then/skew/DONE
