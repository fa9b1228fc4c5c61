"""The tables and lines that ``hwloop finetune`` and ``hwloop evaluate`` print."""

from __future__ import annotations

from hwloop.train.progress import format_joules, link_health, plural

__all__ = ["format_eval", "format_table"]


def format_eval(res: dict) -> str:
    """``accuracy 81.20 % (mean of 3: 81.07 +- 0.15, range 80.9-81.2), spikes/neuron ...``."""
    sp = res.get("spread") or {}
    acc = f"accuracy {100 * res['accuracy']:.2f} %"
    if sp.get("repeats", 1) > 1:
        acc = (f"accuracy {100 * sp['mean']:.2f} +- {100 * sp['sd']:.2f} % over {sp['repeats']} "
               f"repeats (range {100 * sp['min']:.2f}-{100 * sp['max']:.2f})")
    return (f"{acc}, spikes/neuron {res['spikes_per_neuron']:.3f}, energy/inference "
            f"{format_joules(res.get('energy_j_per_sample'))}")


def format_table(report: dict) -> str:
    """The closing table of `hwloop finetune`."""
    b, a = report["before"], report["after"]
    def acc(res: dict) -> str:
        sp = res.get("spread") or {}
        if sp.get("repeats", 1) > 1:
            return f"{100 * sp['mean']:.2f} +- {100 * sp['sd']:.2f}"
        return f"{100 * res['accuracy']:.2f}"
    rows = [
        ("ReLU (float)", f"{100 * b['relu']:.2f}", "-", "-"),
        ("ideal SNN (B1)", f"{100 * b['ideal_snn']['accuracy']:.2f}",
         f"{b['ideal_snn']['spikes_per_neuron']:.3f}", "-"),
        ("device, before", acc(b['device']), f"{b['device']['spikes_per_neuron']:.3f}",
         format_joules(b['device']['energy_j_per_sample'])),
        ("device, after", acc(a['device']), f"{a['device']['spikes_per_neuron']:.3f}",
         format_joules(a['device']['energy_j_per_sample'])),
    ]
    w = max(10, *(len(r[1]) for r in rows))
    lines = [f"{'':18} {'accuracy %':>{w}} {'spikes/neuron':>14} {'energy/inference':>17}"]
    lines += [f"{r[0]:18} {r[1]:>{w}} {r[2]:>14} {r[3]:>17}" for r in rows]
    reps = (b["device"].get("spread") or {}).get("repeats", 1)
    if reps > 1:
        lines.append(f"device accuracy: mean +- SD over {reps} evaluations with fresh jitter; "
                     f"fine-tuning changed it by {100 * (a['device']['spread']['mean'] - b['device']['spread']['mean']):+.2f} points")
    health = (report.get("provenance") or {}).get("health")
    if health:
        lines.append(link_health({k: health[k] for k in ("retries", "crc_errors", "resends", "nudges",
                                                         "timeouts", "resyncs") if k in health}))
    lines.append(f"fine-tuning: {plural(report['finetune']['epochs'], 'epoch')} x "
                 f"{plural(report['steps_per_epoch'], 'step')}, "
                 f"{report['finetune_wall_time_s']:.1f} s; total wall time {report['wall_time_s']:.1f} s; "
                 f"device calls {report['device_calls']}")
    return "\n".join(lines)
