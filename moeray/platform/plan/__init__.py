"""`moeray plan`: capacity planning (report.py) and `moeray plan timeline` (timeline.py), the
pipeline schedules side by side."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv and argv[0] == "timeline":
        from moeray.platform.plan import timeline

        return timeline.main(argv[1:])
    from moeray.platform.plan import report

    return report.main(argv)
