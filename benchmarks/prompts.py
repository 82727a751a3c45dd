"""The fixed chat prompts every benchmark run sends, cycled: realistic, of varied lengths.

Roughly 20 to 400 prompt tokens once templated (the exact counts depend on the tokenizer and
are recorded in each result file). Fixed text, so runs on different days compare.
"""

from __future__ import annotations

_SUPPORT_SYSTEM = (
    "You are a patient support assistant for a small online bookshop. Answer in plain "
    "language, keep answers short, and never invent order numbers or prices."
)

_MEETING_NOTES = """\
Weekly sync, platform team. Present: Ana, Bram, Chen, Dalia, Emeka.
1. Release 4.2 slipped by a week. The migration script that rewrites customer addresses failed \
on about 3% of rows in staging because some postcodes contain spaces in the middle and the \
validator rejected them. Bram has a fix in review; it relaxes the validator and adds a test \
with the twelve failing examples. Ana asked for a dry run on a copy of production before the \
release, which everyone agreed to. The dry run is booked for Thursday night.
2. On-call load. Chen reported 14 pages last week, 9 of them from the disk-usage alert on the \
log servers. The alert fires at 80% but log rotation only runs at midnight, so the alert fires \
every evening and clears itself. Proposal: raise the threshold to 90% and rotate every six \
hours. Dalia was worried that a real incident could fill the disk within six hours; Chen will \
check the worst growth rate seen in the last quarter before changing anything.
3. Cost. The cloud bill rose 18% month over month. Most of the increase is the new analytics \
cluster, which runs at full size overnight even though the reports finish by 2 a.m. Emeka will \
add a schedule that scales it down at 3 a.m. and up again at 6 p.m., and will report the saving \
next week.
4. Hiring. Two candidates for the SRE role reached the final round. Interviews are on Monday and \
Tuesday; Ana and Dalia are on the panel.
Action items: Bram merges the validator fix; Ana books the dry run; Chen checks disk growth; \
Emeka schedules the analytics cluster; Dalia collects interview feedback by Wednesday."""

_CODE = """\
def merge_intervals(intervals):
    intervals.sort()
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged"""

_ESSAY_REQUEST = (
    "I am preparing a ten-minute talk for a local history society about how towns got their "
    "street lighting. I want to cover oil lamps, gas lighting in the nineteenth century, the "
    "first electric arc lamps, and the switch to sodium and then LED lamps. The audience is "
    "mostly retired people who like concrete stories more than dates. Please suggest an "
    "outline with five sections, one memorable anecdote or image for each section, and a "
    "closing line that invites questions."
)

PROMPTS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of Australia?"}],
    [{"role": "user", "content": "Give me three ideas for a quick vegetarian dinner tonight."}],
    [
        {"role": "system", "content": _SUPPORT_SYSTEM},
        {"role": "user", "content": "My parcel says delivered but it is not at my door. "
         "What should I do first, and how long should I wait before contacting you again?"},
    ],
    [
        {"role": "user", "content": "What does this Python function do, and what is its "
         f"time complexity?\n\n{_CODE}"},
    ],
    [
        {"role": "user", "content": "I want to start running. I am 45 and have not exercised "
         "in years."},
        {"role": "assistant", "content": "Start with walking and short jogging intervals, "
         "three times a week, and increase slowly."},
        {"role": "user", "content": "How many weeks until I can run five kilometres without "
         "stopping, and what should a typical week look like?"},
    ],
    [{"role": "user", "content": _ESSAY_REQUEST}],
    [
        {"role": "system", "content": "You write clear, neutral summaries for busy managers."},
        {"role": "user", "content": "Summarise these meeting notes in five bullet points and "
         f"list the owners of each action item.\n\n{_MEETING_NOTES}"},
    ],
    [
        {"role": "user", "content": f"{_MEETING_NOTES}\n\nDraft a short, friendly email from "
         "Ana to the team that confirms the dry run, explains why it matters, and asks for "
         "volunteers to watch the dashboards during it. Then list any risk in the notes that "
         "nobody owns yet."},
    ],
)


def prompt_for(index: int) -> list[dict[str, str]]:
    """The index-th request's messages: the fixed prompts, cycled."""
    return PROMPTS[index % len(PROMPTS)]
