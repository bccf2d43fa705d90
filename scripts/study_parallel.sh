#!/usr/bin/env bash
# Run a translation study's rows side by side on one machine (e.g. every row sharing one GPU), then write the joint
# table. Every group of rows is its own `study` process, started at once; the conversion rows start when the
# original's process has ended. A row another process is running is waited for (rows/<row>/.lock): none trains twice.
#
#   scripts/study_parallel.sh DATASET OUT [study options...]
#   e.g. scripts/study_parallel.sh multi30k runs/study-m30k-full --budget full --data-dir data/multi30k
#
# Environment (optional):
#   SCRATCH_GROUPS  ';'-separated groups of comma-separated rows, one process per group
#                   (default: one process per from-scratch row of DATASET)
#   CONVERT_ROWS    comma-separated rows that start from the trained original, one process each
#                   (default: the conversion rows)
#   CONVERT_ARGS    extra study options of those processes (e.g. "--max-minutes 2" for svd-o-all's train schedule)
#   STUDY           the study command (default: compressed-transformer study)
#   RESCORE         1 (default): the last step (study --rescore) decodes every trained row's test set again, one row
#                   after another, so that the table's decoding times are not those of rows sharing the machine;
#                   0: it only writes the outputs (study --report-only)
# Each process logs to OUT/logs/<first row>.log; the last step writes table.md, results.json and bleu_vs_ratio.png
# from every finished row. Rerunning the script resumes unfinished rows, skips finished ones.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,21p' "$0" >&2
    exit 2
fi
dataset=$1 out=$2
shift 2
read -r -a study <<<"${STUDY:-compressed-transformer study}"
case ${RESCORE:-1} in # checked before hours of training, not after
1) last=--rescore ;;
0) last=--report-only ;;
*)
    echo "RESCORE must be 0 or 1, not '$RESCORE'" >&2
    exit 2
    ;;
esac
case $dataset in
iwslt14)
    scratch_default="original;tt-all;tt-1/2;tucker-all"
    convert_default=""
    ;;
*)
    scratch_default="original;tt-all;tt-3/4;tt-1/2;tt-1/4;small;tucker-all;svd-all;tt-all+attn;tt-all+attn+emb;tt-all+emb;tt-all+ttemb"
    convert_default="svd-all-convert,prune-all,sparse-all,svd-o-all,tt-all-convert"
    ;;
esac
IFS=';' read -r -a groups <<<"${SCRATCH_GROUPS-$scratch_default}"
IFS=',' read -r -a converts <<<"${CONVERT_ROWS-$convert_default}"
read -r -a convert_args <<<"${CONVERT_ARGS:-}"
mkdir -p "$out/logs"

# the first process writes study.json before the others read it
"${study[@]}" "$dataset" --out "$out" --report-only "$@" >/dev/null

declare -A pids=()
log_of() { # rows -> OUT/logs/<first row, '/' as '_'>.log
    local first=${1%%,*}
    echo "$out/logs/${first//\//_}.log"
}
start() { # rows [extra study options...]
    local rows=$1
    shift
    "${study[@]}" "$dataset" --out "$out" --rows "$rows" --no-progress "$@" >"$(log_of "$rows")" 2>&1 &
    pids[$rows]=$!
}
original="" original_status=""
for group in "${groups[@]}"; do
    [[ -z $group ]] && continue
    start "$group" "$@"
    [[ ,$group, == *,original,* ]] && original=$group
done
# Conversion rows start once the original's process has ended: started earlier, one of them would take the
# original's lock first and train it under its own options (CONVERT_ARGS).
if [[ -n $original && ${#converts[@]} -gt 0 ]]; then
    original_status=0
    wait "${pids[$original]}" || original_status=$? # reported below (the conversion rows then fail too)
fi
for row in "${converts[@]}"; do
    [[ -n $row ]] && start "$row" "$@" "${convert_args[@]}"
done
status=0
for rows in "${!pids[@]}"; do
    if [[ $rows == "$original" && -n $original_status ]]; then
        code=$original_status # already waited for
    else
        code=0
        wait "${pids[$rows]}" || code=$?
    fi
    if [[ $code -ne 0 ]]; then
        echo "rows '$rows' failed: see $(log_of "$rows")" >&2
        status=1
    fi
done
"${study[@]}" "$dataset" --out "$out" "$last" "$@"
exit $status
