#!/bin/bash
# Presence cost per delivery (docs/benchmarks.md): presence-churn.sh's stack with a fan-out run
# instead of churn: VIEWERS viewers in one room, a publish step at RATE msgs/s for DUR s. Run from
# a scratch directory. Usage: presence-fanout.sh on|off
SCENARIO=fanout exec "$(dirname "$0")/presence-churn.sh" "$@"
