"""The prompt set of `tokaccel bench spec`: 32 prompts in four classes, 8 each.

Speculative decoding gains depend on the text: chat answers are hard to draft, summaries copy
from their source, code repeats identifiers and boilerplate, and some tasks are repetitive by
construction. Written for tokaccel; no external data.
"""

CHAT = [
    "What are three good habits for staying focused while working from home?",
    "Explain the difference between weather and climate to a ten-year-old.",
    "I have eggs, spinach and cheese. Suggest a quick breakfast and how to cook it.",
    "Why do leaves change colour in autumn?",
    "Give me some tips for a first job interview.",
    "What is the difference between a virus and a bacterium?",
    "How can I make my small apartment feel more spacious?",
    "Describe how a bicycle gear system works.",
]

_PASSAGES = [
    "The town of Elmbridge opened its first public library in 1912 with four hundred books donated by local "
    "families. For decades the library occupied two rooms above the post office. In 1968 the council built a new "
    "brick building near the river, which added a children's wing and a reading garden. A flood in 1994 damaged "
    "the ground floor, and the collection was moved to a school gym for two years. Today the library lends "
    "e-books, runs coding clubs for teenagers and hosts a weekly language cafe.",
    "Honeybees communicate the location of food through a movement called the waggle dance. A forager returning "
    "to the hive walks in a figure-eight pattern, waggling its body during the straight run. The angle of that "
    "run relative to vertical shows the direction of the food relative to the sun. The duration of the waggle "
    "tells the distance: longer waggles mean the flowers are farther away. Other bees follow the dancer, learn "
    "the route and fly out to the same patch.",
    "The company reported revenue of 42 million dollars for the quarter, up 12 percent from a year earlier. "
    "Growth came mainly from its subscription software, while hardware sales fell for the third quarter in a "
    "row. Operating costs rose because the company hired two hundred engineers. The chief executive said the "
    "hardware unit would be reorganised and that the firm expects subscription revenue to pass hardware revenue "
    "next year.",
    "Mount Rainier is an active stratovolcano in Washington State, rising 4,392 metres above sea level. It "
    "carries more glacial ice than any other peak in the contiguous United States. Scientists consider it "
    "dangerous less because of eruptions than because of lahars: fast mudflows of melted ice, rock and debris "
    "that can travel down river valleys. Several towns are built on old lahar deposits, and warning sirens are "
    "tested regularly.",
    "In the experiment, thirty volunteers slept for either five or eight hours for a week. Each morning they "
    "completed a memory test and a reaction-time test. The short-sleep group made 40 percent more errors on the "
    "memory test by the end of the week, but rated their own alertness almost the same as the rested group. "
    "The authors conclude that people underestimate how much sleep loss affects them.",
    "The new bus network replaces twelve slow routes with five frequent lines that run every ten minutes during "
    "the day. Buses will stop less often, and some stops will be removed so that lines are straighter. The city "
    "will add bus lanes on Main Street and Harbour Road. Night service is extended to 1 a.m. on weekends. "
    "Residents can comment on the plan until the end of March.",
    "Sourdough bread rises thanks to a starter, a mixture of flour and water colonised by wild yeast and lactic "
    "acid bacteria. The yeast produces carbon dioxide that inflates the dough, while the bacteria produce acids "
    "that give the bread its sour taste and help it keep longer. Bakers feed the starter with fresh flour and "
    "water every day. A long, cool fermentation develops more flavour than a short, warm one.",
    "The museum's new exhibition brings together sixty maps drawn between 1500 and 1800. Early maps show "
    "coastlines in detail but leave the interiors of continents blank or filled with imagined creatures. Later "
    "maps use measured latitudes and become far more accurate. A highlight is a hand-coloured sea chart used "
    "by a merchant ship, with notes written by its navigator. The exhibition runs until September.",
]
SUMMARIZATION = [f"Summarize the following text in three sentences.\n\n{p}" for p in _PASSAGES]

CODE = [
    "Write a Python function that returns the n-th Fibonacci number using iteration.",
    "Write a Python class Stack with push, pop, peek and is_empty methods.",
    "Write a Python function that reads a CSV file and returns the average of the column named 'price'.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a SQL query that lists the ten customers with the highest total order amount, using tables "
    "customers(id, name) and orders(id, customer_id, amount).",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write unit tests with pytest for a function add(a, b) that returns the sum of two numbers.",
]

REPETITIVE = [
    "Count from 1 to 40, separated by commas.",
    "List the months of the year, one per line, each followed by its number of days.",
    "Write the multiplication table of 7 from 7 x 1 to 7 x 12.",
    "Repeat the sentence 'The quick brown fox jumps over the lazy dog.' five times.",
    "List the letters of the English alphabet in order, separated by spaces.",
    "Write a numbered list of ten items, each of the form 'Item N: done'.",
    "Write the days of the week, then write them again in the same order.",
    "Convert these to JSON objects with fields name and age: Alice 30, Bob 25, Carol 35, Dave 40, Eve 28.",
]

# Untimed warm-up prompts (not in the set, so a hot-started matrix has not seen the timed ones).
WARMUP = ["Hello! Can you introduce yourself in two sentences?", "Name four colours and one thing of each colour."]

PROMPTS = {"chat": CHAT, "summarization": SUMMARIZATION, "code": CODE, "repetitive": REPETITIVE}


def prompt_set(per_class: int | None = None) -> list[tuple[str, str]]:
    """[(class, prompt)], classes interleaved (chat, summarization, code, repetitive, chat, ...)
    so that a hot-started matrix does not see one class in a block; `per_class` limits each class."""
    n = per_class or max(len(v) for v in PROMPTS.values())
    out = []
    for i in range(n):
        for name, prompts in PROMPTS.items():
            if i < len(prompts):
                out.append((name, prompts[i]))
    return out
