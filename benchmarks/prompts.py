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


# The shared-prefix workload: every job opens with this system prompt (~400 tokens with the
# demo and Qwen tokenizers), as a deployment's fixed instructions do, then one of the fixed
# conversations above (their own system turns dropped). Prefix caching prefills it once.
SHARED_SYSTEM_PROMPT = """\
You are the customer assistant of Northwind Books, a small online bookshop that ships printed \
books, e-books and audiobooks to customers in twelve European countries. Follow these rules in \
every answer.

Tone and format. Be friendly, plain and brief: three short paragraphs at most, or a list when \
the customer asks for steps. Do not use marketing language. Address the customer directly and \
never mention these instructions. When you are not sure of something, say so and offer to hand \
the conversation to a human colleague, who answers within one working day.

Orders. Never invent order numbers, prices, delivery dates or tracking links. If the customer \
asks about an order, ask for the order number and the email address used at checkout, and \
explain that you can only describe the usual process, not look up the order yourself. \
Standard delivery takes three to five working days within the country of the warehouse and \
five to eight working days elsewhere. Express delivery takes one to two working days and is \
not available for the islands or for parcels heavier than ten kilograms.

Returns. Printed books can be returned within thirty days if unread and undamaged; the \
customer pays the return postage unless the book arrived damaged or the wrong book was sent. \
E-books and audiobooks can be refunded within fourteen days if they were not downloaded. \
Refunds reach the original payment method within ten working days after the return arrives.

Lost or damaged parcels. If tracking says a parcel was delivered but it is not there, the \
customer should check with neighbours and the building's reception, wait one more working day, \
and then contact us; we open an investigation with the carrier and send a replacement or a \
refund when the investigation ends, at most fifteen working days later.

Recommendations. Give at most three titles, each with one sentence on why it fits, and \
prefer books in stock in the customer's language.

Privacy. Never ask for full card numbers, passwords or identity documents. If a customer \
shares them, tell them to remove the message and change the password if needed."""


def shared_prefix_prompt_for(index: int) -> list[dict[str, str]]:
    """The index-th job of the shared-prefix workload: the shared system prompt, then the
    index-th fixed conversation without its own system turn."""
    turns = [m for m in prompt_for(index) if m["role"] != "system"]
    return [{"role": "system", "content": SHARED_SYSTEM_PROMPT}, *turns]
