"""Generate prunekit's bundled knowledge-retention question set (src/prunekit/eval/data/knowledge.jsonl).

Why: a pruned model can keep its perplexity yet forget facts (LLM-KICK, arXiv 2310.01382), so
`prunekit eval --suite knowledge` asks short factual questions and scores them two ways: exact
match of a greedy answer after normalisation, and the log-likelihood rank of the correct option
among four. The questions below were written for this project; they are not taken from any
benchmark.

Each table row is ``(question, accepted answers, three distractors)``. The first accepted answer
is the canonical one and becomes the correct multiple-choice option. Arithmetic rows are computed,
not typed, so their answers cannot be wrong.

Conventions that keep exact match well defined (tests/eval/test_knowledge_data.py checks them):
* answers use only letters, digits and spaces, plus "." or "-" inside a number ("4.5", "-5"),
  so every reading of "remove punctuation" normalises them the same way;
* numbers: digits first, then the word form when it is one word ("12", "twelve");
* accepted answers of one question stay distinct after normalisation (so not both "Nile" and
  "the Nile": the normaliser drops leading articles).

The position of the correct option is balanced within each category (equal counts of 0, 1, 2, 3,
up to one) and shuffled with a seeded RNG, so the output is identical on every run.

Usage: python scripts/make_knowledge.py [OUT]   (default: the bundled path; written atomically)
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src/prunekit/eval/data/knowledge.jsonl"

# One-word English names of numbers; results with a hyphenated name ("twenty-one") get digits only.
NUMBER_WORDS = {
    0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
    8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve", 13: "thirteen",
    14: "fourteen", 15: "fifteen", 16: "sixteen", 17: "seventeen", 18: "eighteen",
    19: "nineteen", 20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty",
    70: "seventy", 80: "eighty", 90: "ninety", 100: "one hundred", 1000: "one thousand",
}


def number_answers(value: int) -> list[str]:
    """Accepted answers for a whole number: digits first, then the word form when there is one."""
    return [str(value)] + ([NUMBER_WORDS[value]] if value in NUMBER_WORDS else [])


# --------------------------------------------------------------------------------------------
# geography: capitals, continents, rivers, oceans, landmarks
# --------------------------------------------------------------------------------------------
CAPITALS = [
    # (country, capital, [other accepted spellings], three other cities of that country)
    ("France", "Paris", [], ["Lyon", "Marseille", "Nice"]),
    ("Germany", "Berlin", [], ["Munich", "Hamburg", "Frankfurt"]),
    ("Italy", "Rome", [], ["Milan", "Naples", "Florence"]),
    ("Spain", "Madrid", [], ["Barcelona", "Seville", "Valencia"]),
    ("Portugal", "Lisbon", [], ["Porto", "Braga", "Faro"]),
    ("the United Kingdom", "London", [], ["Manchester", "Birmingham", "Liverpool"]),
    ("Ireland", "Dublin", [], ["Cork", "Galway", "Limerick"]),
    ("Japan", "Tokyo", [], ["Osaka", "Kyoto", "Yokohama"]),
    ("China", "Beijing", ["Peking"], ["Shanghai", "Guangzhou", "Shenzhen"]),
    ("Russia", "Moscow", [], ["Saint Petersburg", "Novosibirsk", "Kazan"]),
    ("Egypt", "Cairo", [], ["Alexandria", "Giza", "Luxor"]),
    ("Canada", "Ottawa", [], ["Toronto", "Montreal", "Vancouver"]),
    ("Australia", "Canberra", [], ["Sydney", "Melbourne", "Perth"]),
    ("Brazil", "Brasília", ["Brasilia"], ["Rio de Janeiro", "São Paulo", "Salvador"]),
    ("Argentina", "Buenos Aires", [], ["Córdoba", "Rosario", "Mendoza"]),
    ("Mexico", "Mexico City", [], ["Guadalajara", "Monterrey", "Cancún"]),
    ("India", "New Delhi", ["Delhi"], ["Mumbai", "Kolkata", "Bangalore"]),
    ("Greece", "Athens", [], ["Thessaloniki", "Patras", "Heraklion"]),
    ("Norway", "Oslo", [], ["Bergen", "Trondheim", "Stavanger"]),
    ("Sweden", "Stockholm", [], ["Gothenburg", "Malmö", "Uppsala"]),
    ("Finland", "Helsinki", [], ["Tampere", "Turku", "Oulu"]),
    ("Denmark", "Copenhagen", [], ["Aarhus", "Odense", "Aalborg"]),
    ("Poland", "Warsaw", [], ["Kraków", "Gdańsk", "Wrocław"]),
    ("Austria", "Vienna", [], ["Salzburg", "Graz", "Innsbruck"]),
    ("Hungary", "Budapest", [], ["Debrecen", "Szeged", "Pécs"]),
    ("the Czech Republic", "Prague", [], ["Brno", "Ostrava", "Plzeň"]),
    ("Turkey", "Ankara", [], ["Istanbul", "Izmir", "Antalya"]),
    ("Kenya", "Nairobi", [], ["Mombasa", "Kisumu", "Nakuru"]),
    ("Thailand", "Bangkok", [], ["Chiang Mai", "Phuket", "Pattaya"]),
    ("South Korea", "Seoul", [], ["Busan", "Incheon", "Daegu"]),
    ("Peru", "Lima", [], ["Cusco", "Arequipa", "Trujillo"]),
    ("Cuba", "Havana", [], ["Santiago de Cuba", "Varadero", "Camagüey"]),
    ("Nigeria", "Abuja", [], ["Lagos", "Kano", "Ibadan"]),
    ("New Zealand", "Wellington", [], ["Auckland", "Christchurch", "Hamilton"]),
    ("Saudi Arabia", "Riyadh", [], ["Jeddah", "Mecca", "Medina"]),
    ("Vietnam", "Hanoi", [], ["Ho Chi Minh City", "Da Nang", "Hue"]),
    ("Iceland", "Reykjavík", ["Reykjavik"], ["Akureyri", "Keflavik", "Selfoss"]),
    ("Scotland", "Edinburgh", [], ["Glasgow", "Aberdeen", "Dundee"]),
]

GEOGRAPHY = [(f"What is the capital of {country}?", [capital, *variants], others)
             for country, capital, variants, others in CAPITALS] + [
    ("On which continent is Egypt?", ["Africa"], ["Oceania", "Europe", "South America"]),  # Sinai is in Asia
    ("On which continent is Brazil?", ["South America"], ["Africa", "North America", "Europe"]),
    ("On which continent is Japan?", ["Asia"], ["Europe", "Oceania", "North America"]),
    ("On which continent is Canada?", ["North America"], ["Europe", "South America", "Asia"]),
    ("On which continent is Germany?", ["Europe"], ["Asia", "Africa", "North America"]),
    ("On which continent is Kenya?", ["Africa"], ["Asia", "South America", "Europe"]),
    ("On which continent is the South Pole?", ["Antarctica"], ["Africa", "South America", "Asia"]),
    ("What is the largest continent by area?", ["Asia"], ["Africa", "Europe", "North America"]),
    ("Which river flows through Cairo?", ["Nile"], ["Congo", "Niger", "Euphrates"]),
    ("Which river flows through London?", ["Thames", "River Thames"], ["Severn", "Seine", "Trent"]),
    ("Which river flows through Paris?", ["Seine"], ["Loire", "Rhône", "Thames"]),
    ("Which river flows through Rome?", ["Tiber"], ["Po", "Arno", "Danube"]),
    ("Which river flows through both Vienna and Budapest?", ["Danube"], ["Rhine", "Elbe", "Volga"]),
    ("Which river carries more water to the sea than any other river on Earth?", ["Amazon"],
     ["Mississippi", "Yangtze", "Danube"]),
    ("What is the largest ocean on Earth?", ["Pacific Ocean", "Pacific"],
     ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("Which ocean lies between Europe and North America?", ["Atlantic Ocean", "Atlantic"],
     ["Pacific Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("Which ocean surrounds the North Pole?", ["Arctic Ocean", "Arctic"],
     ["Southern Ocean", "Atlantic Ocean", "Pacific Ocean"]),
    ("Which ocean lies directly south of India?", ["Indian Ocean", "Indian"],
     ["Pacific Ocean", "Atlantic Ocean", "Arctic Ocean"]),
    ("What is the highest mountain on Earth above sea level?", ["Mount Everest", "Everest"],
     ["K2", "Mont Blanc", "Kilimanjaro"]),
    ("What is the largest hot desert in the world?", ["Sahara", "Sahara Desert"],
     ["Gobi", "Kalahari", "Mojave"]),
    ("What is the largest country in the world by area?", ["Russia"], ["Canada", "China", "Brazil"]),
    ("In which country is Mount Kilimanjaro?", ["Tanzania"], ["Kenya", "Uganda", "Ethiopia"]),
    ("In which country is the city of Venice?", ["Italy"], ["France", "Spain", "Greece"]),
    ("In which city is the Eiffel Tower?", ["Paris"], ["London", "Rome", "Brussels"]),
    ("In which city is the Statue of Liberty?", ["New York City", "New York", "NYC"],
     ["Boston", "Chicago", "Philadelphia"]),
    ("Off the coast of which country is the Great Barrier Reef?", ["Australia"],
     ["New Zealand", "Indonesia", "Brazil"]),
    ("On which continent are the Andes mountains?", ["South America"], ["Asia", "Africa", "Europe"]),
    ("Which is the largest US state by area?", ["Alaska"], ["Texas", "California", "Montana"]),
    ("What imaginary line divides the Earth into the Northern and Southern Hemispheres?",
     ["equator"], ["prime meridian", "Tropic of Cancer", "Arctic Circle"]),
    ("Which narrow strait separates Spain from Morocco?", ["Strait of Gibraltar", "Gibraltar"],
     ["Strait of Dover", "Bosphorus", "Strait of Hormuz"]),
    ("What is the largest island in the world?", ["Greenland"], ["Madagascar", "Borneo", "Iceland"]),
]

# --------------------------------------------------------------------------------------------
# chemistry: element symbols (both directions), simple formulas, basic facts
# --------------------------------------------------------------------------------------------
SYMBOLS = [
    # (element, symbol, [other accepted names], three wrong symbols)
    ("hydrogen", "H", [], ["He", "Hy", "Hd"]),
    ("helium", "He", [], ["H", "Hl", "Hm"]),
    ("carbon", "C", [], ["Ca", "Co", "Cr"]),
    ("nitrogen", "N", [], ["Ni", "Na", "Ne"]),
    ("oxygen", "O", [], ["Ox", "Os", "Og"]),
    ("sodium", "Na", [], ["S", "So", "Sd"]),
    ("potassium", "K", [], ["P", "Po", "Pt"]),
    ("iron", "Fe", [], ["Ir", "In", "I"]),
    ("gold", "Au", [], ["Ag", "Go", "Gd"]),
    ("silver", "Ag", [], ["Au", "Si", "Sv"]),
    ("copper", "Cu", [], ["Co", "Cp", "Cr"]),
    ("lead", "Pb", [], ["Le", "Ld", "Pl"]),
    ("mercury", "Hg", [], ["Me", "Mr", "Hy"]),
    ("tin", "Sn", [], ["Ti", "Tn", "Sb"]),
    ("calcium", "Ca", [], ["C", "Cl", "Cm"]),
    ("chlorine", "Cl", [], ["Ch", "C", "Co"]),
    ("zinc", "Zn", [], ["Zi", "Z", "Zc"]),
    ("magnesium", "Mg", [], ["Mn", "Ma", "Mo"]),
    ("tungsten", "W", [], ["Tu", "Tg", "Ts"]),
    ("uranium", "U", [], ["Ur", "Un", "Um"]),
]
SYMBOL_TO_ELEMENT = [
    # (symbol, element, [other accepted names], three other elements)
    ("Fe", "iron", [], ["fluorine", "francium", "lead"]),
    ("Na", "sodium", [], ["nitrogen", "neon", "nickel"]),
    ("K", "potassium", [], ["krypton", "calcium", "phosphorus"]),
    ("Pb", "lead", [], ["platinum", "plutonium", "palladium"]),
    ("Ag", "silver", [], ["gold", "argon", "aluminium"]),
    ("Al", "aluminium", ["aluminum"], ["argon", "silver", "arsenic"]),
    ("S", "sulfur", ["sulphur"], ["sodium", "silicon", "tin"]),
    ("Ne", "neon", [], ["nitrogen", "nickel", "sodium"]),
    ("Si", "silicon", [], ["silver", "sulfur", "tin"]),
    ("P", "phosphorus", [], ["potassium", "lead", "polonium"]),
]

CHEMISTRY = (
    [(f"What is the chemical symbol for {element}?", [symbol, *variants], wrong)
     for element, symbol, variants, wrong in SYMBOLS]
    + [(f"Which element has the chemical symbol {symbol}?", [element, *variants], others)
       for symbol, element, variants, others in SYMBOL_TO_ELEMENT]
    + [
        ("What is the chemical formula for water?", ["H2O"], ["H2O2", "HO", "CO2"]),
        ("What is the chemical formula for carbon dioxide?", ["CO2"], ["CO", "C2O", "O2"]),
        ("What is the chemical formula for table salt?", ["NaCl"], ["KCl", "NaCO3", "HCl"]),
        ("What is the chemical formula for methane?", ["CH4"], ["C2H6", "CH3", "CO2"]),
        ("What is the chemical formula for ammonia?", ["NH3"], ["NH4", "N2", "NO2"]),
        ("What is the chemical formula for ozone?", ["O3"], ["O2", "O", "CO3"]),
        ("Which element has the atomic number 1?", ["hydrogen"], ["helium", "oxygen", "carbon"]),
        ("What is the atomic number of carbon?", number_answers(6),
         ["12", "4", "8"]),
        ("Which gas makes up most of the Earth's atmosphere?", ["nitrogen"],
         ["oxygen", "carbon dioxide", "argon"]),
        ("What is the pH of pure water at 25 degrees Celsius?", number_answers(7),
         ["0", "1", "14"]),
    ]
)

# --------------------------------------------------------------------------------------------
# units: SI units and everyday conversions
# --------------------------------------------------------------------------------------------
UNITS = [
    ("What is the SI base unit of length?", ["metre", "meter"], ["foot", "yard", "mile"]),
    ("What is the SI base unit of mass?", ["kilogram", "kilogramme", "kg"],
     ["pound", "ounce", "gram"]),
    ("What is the SI base unit of time?", ["second", "seconds"], ["minute", "hour", "day"]),
    ("What is the SI base unit of electric current?", ["ampere", "amp", "amperes", "amps"],
     ["volt", "ohm", "watt"]),
    ("What is the SI base unit of thermodynamic temperature?", ["kelvin"],
     ["Fahrenheit", "Rankine", "joule"]),
    ("What is the SI base unit of amount of substance?", ["mole", "mol"],
     ["gram", "litre", "candela"]),
    ("What is the SI base unit of luminous intensity?", ["candela"], ["lumen", "lux", "watt"]),
    ("What is the SI unit of force?", ["newton", "newtons"], ["joule", "watt", "pascal"]),
    ("What is the SI unit of energy?", ["joule", "joules"], ["newton", "watt", "volt"]),
    ("What is the SI unit of power?", ["watt", "watts"], ["joule", "newton", "volt"]),
    ("What is the SI unit of pressure?", ["pascal", "pascals"], ["newton", "joule", "hertz"]),
    ("What is the SI unit of frequency?", ["hertz"], ["watt", "pascal", "tesla"]),
    ("What is the SI unit of electric potential difference?", ["volt", "volts"],
     ["ampere", "ohm", "watt"]),
    ("What is the SI unit of electrical resistance?", ["ohm", "ohms"], ["volt", "ampere", "farad"]),
    ("What is the SI unit of electric charge?", ["coulomb", "coulombs"],
     ["ampere", "volt", "farad"]),
    ("What is the SI unit of capacitance?", ["farad", "farads"], ["henry", "ohm", "coulomb"]),
    ("What is the SI unit of magnetic flux density?", ["tesla"], ["weber", "henry", "farad"]),
    ("How many centimetres are in a metre?", number_answers(100), ["10", "1000", "12"]),
    ("How many millimetres are in a centimetre?", number_answers(10), ["100", "1000", "5"]),
    ("How many metres are in a kilometre?", number_answers(1000), ["100", "10000", "10"]),
    ("How many grams are in a kilogram?", number_answers(1000), ["100", "10", "10000"]),
    ("How many millilitres are in a litre?", number_answers(1000), ["100", "10", "500"]),
    ("How many litres are in a cubic metre?", number_answers(1000), ["100", "10", "1000000"]),
    ("How many seconds are in a minute?", number_answers(60), ["100", "30", "24"]),
    ("How many minutes are in an hour?", number_answers(60), ["100", "30", "24"]),
    ("How many hours are in a day?", number_answers(24), ["12", "60", "20"]),
    ("How many seconds are in an hour?", number_answers(3600), ["360", "600", "6000"]),
    ("How many inches are in a foot?", number_answers(12), ["10", "3", "36"]),
    ("How many feet are in a yard?", number_answers(3), ["12", "10", "5"]),
    ("How many ounces are in a pound?", number_answers(16), ["8", "10", "14"]),  # not 12: right for a troy pound
    ("How many centimetres are in an inch?", ["2.54"], ["2.45", "3.14", "1.61"]),
    ("How many grams are in half a kilogram?", number_answers(500), ["50", "250", "5000"]),
    ("At standard atmospheric pressure, water boils at how many degrees Celsius?",
     number_answers(100), ["90", "212", "50"]),
    ("Water freezes at how many degrees Celsius?", number_answers(0), ["32", "100", "10"]),
    ("Water freezes at how many degrees Fahrenheit?", number_answers(32), ["0", "100", "212"]),
    ("The metric prefix kilo means how many times the base unit?", number_answers(1000),
     ["100", "1000000", "10"]),
    ("As a decimal, what fraction of the base unit does the metric prefix milli stand for?",
     ["0.001"], ["0.01", "0.1", "0.0001"]),
    ("What unit of angle divides a full circle into 360 equal parts?", ["degree", "degrees"],
     ["radian", "gradian", "steradian"]),
]

# --------------------------------------------------------------------------------------------
# dates: well-established years
# --------------------------------------------------------------------------------------------
DATES = [
    # (question, year, three wrong years)
    ("In what year did World War II end?", 1945, [1944, 1946, 1939]),
    ("In what year did World War II begin?", 1939, [1938, 1941, 1914]),
    ("In what year did World War I begin?", 1914, [1912, 1916, 1918]),
    ("In what year did World War I end?", 1918, [1917, 1919, 1914]),
    ("In what year did Christopher Columbus first reach the Americas?", 1492, [1429, 1498, 1502]),
    ("In what year was the United States Declaration of Independence adopted?", 1776,
     [1767, 1783, 1789]),
    ("In what year did the French Revolution begin?", 1789, [1776, 1799, 1815]),
    ("In what year did Apollo 11 land the first people on the Moon?", 1969, [1967, 1968, 1972]),
    ("In what year did the Berlin Wall fall?", 1989, [1987, 1990, 1991]),
    ("In what year was the Berlin Wall built?", 1961, [1949, 1953, 1968]),
    ("In what year did the Titanic sink?", 1912, [1910, 1914, 1921]),
    ("In what year was the Battle of Hastings fought?", 1066, [1056, 1086, 1166]),
    ("In what year was the Magna Carta sealed by King John?", 1215, [1066, 1265, 1315]),
    ("In what year did Constantinople fall to the Ottoman Turks?", 1453, [1354, 1492, 1543]),
    ("In what year did the Russian Revolution take place?", 1917, [1905, 1914, 1921]),
    ("In what year were East and West Germany reunified?", 1990, [1989, 1991, 1992]),
    ("In what year was the Soviet Union dissolved?", 1991, [1989, 1990, 1993]),
    ("In what year did the Soviet Union launch Sputnik 1?", 1957, [1955, 1961, 1969]),
    ("In what year did Yuri Gagarin become the first person in space?", 1961, [1957, 1959, 1963]),
    ("In what year did the Wright brothers make their first powered flight?", 1903,
     [1899, 1908, 1913]),
    ("In what year was the Battle of Waterloo fought?", 1815, [1805, 1812, 1821]),
    ("In what year did the American Civil War end?", 1865, [1861, 1863, 1870]),
    ("In what year did the American Civil War begin?", 1861, [1859, 1865, 1848]),
    ("In what year did the Great Fire of London take place?", 1666, [1606, 1660, 1766]),
    ("In what year did India gain independence from Britain?", 1947, [1945, 1948, 1950]),
    ("In what year did Japan attack Pearl Harbor?", 1941, [1939, 1942, 1944]),
    ("In what year did the D-Day landings in Normandy take place?", 1944, [1942, 1943, 1945]),
    ("In what year did Martin Luther publish his Ninety-five Theses?", 1517, [1492, 1527, 1617]),
    ("In what year was Charles Darwin's On the Origin of Species first published?", 1859,
     [1839, 1869, 1882]),
    ("In what year was the Treaty of Versailles signed?", 1919, [1918, 1920, 1945]),
    ("In what year did the Wall Street Crash take place?", 1929, [1919, 1933, 1939]),
    ("In what year was the Eiffel Tower completed?", 1889, [1869, 1900, 1912]),
    ("In what year were the first modern Olympic Games held in Athens?", 1896,
     [1886, 1900, 1912]),
    ("In what year did the Chernobyl nuclear disaster happen?", 1986, [1979, 1984, 1991]),
    ("In what year did the September 11 attacks on the United States happen?", 2001,
     [1999, 2000, 2003]),
    ("In what year was Nelson Mandela released from prison?", 1990, [1985, 1994, 1989]),
    ("In what year was Nelson Mandela elected President of South Africa?", 1994,
     [1990, 1992, 1999]),
    ("In what year did Queen Elizabeth II die?", 2022, [2020, 2021, 2023]),
    ("In what year did the Boston Tea Party take place?", 1773, [1770, 1776, 1783]),
    ("In what year did Mount Vesuvius destroy Pompeii?", 79, [64, 117, 410]),  # AD 79
]



def year_answers(year: int) -> list[str]:
    """A year as digits; a first-millennium year may also carry its era ("AD 79", "79 AD")."""
    return [str(year)] + ([f"AD {year}", f"{year} AD"] if year < 1000 else [])


# --------------------------------------------------------------------------------------------
# arithmetic: computed from the operands, so the answers are right by construction
# --------------------------------------------------------------------------------------------
OPERATIONS = {
    # word: (function, candidate distractors in order of preference)
    "plus": (lambda a, b: a + b, lambda a, b, r: [r + 1, r - 1, r + 10, r - 10, a * b]),
    "minus": (lambda a, b: a - b, lambda a, b, r: [r + 1, r - 1, a + b, r + 10]),
    "times": (lambda a, b: a * b, lambda a, b, r: [r + a, r - a, r + 1, a + b]),
    "divided by": (lambda a, b: a // b, lambda a, b, r: [r + 1, r - 1, r * 2, a - b]),
}
SUMS = [
    # (a, operation, b, write the operands in words)
    (2, "plus", 3, True), (7, "plus", 5, True), (9, "plus", 6, False), (12, "plus", 8, False),
    (15, "plus", 17, False), (23, "plus", 19, False), (40, "plus", 60, True),
    (8, "plus", 8, True), (34, "plus", 25, False), (46, "plus", 38, False),
    (100, "plus", 250, False), (11, "plus", 9, True),
    (10, "minus", 4, True), (15, "minus", 7, False), (20, "minus", 8, True),
    (50, "minus", 25, False), (63, "minus", 27, False), (100, "minus", 36, False),
    (18, "minus", 9, True), (91, "minus", 45, False), (1000, "minus", 1, False),
    (9, "minus", 9, True),
    (7, "times", 8, False), (6, "times", 6, True), (9, "times", 9, False),
    (12, "times", 12, False), (3, "times", 4, True), (5, "times", 7, False),
    (8, "times", 6, False), (11, "times", 11, False), (4, "times", 25, False),
    (2, "times", 9, True), (10, "times", 10, True), (13, "times", 3, False),
    (20, "divided by", 4, True), (36, "divided by", 6, False), (81, "divided by", 9, False),
    (100, "divided by", 5, False), (56, "divided by", 8, False), (12, "divided by", 3, True),
    (144, "divided by", 12, False), (90, "divided by", 10, True),
]


def arithmetic_rows() -> list[tuple[str, list[str], list[str]]]:
    rows = []
    for a, operation, b, in_words in SUMS:
        compute, candidates = OPERATIONS[operation]
        if operation == "divided by":
            assert a % b == 0, f"{a} / {b} is not whole"
        result = compute(a, b)
        distractors = []
        for candidate in candidates(a, b, result):
            if candidate >= 0 and candidate != result and str(candidate) not in distractors:
                distractors.append(str(candidate))
        left, right = (NUMBER_WORDS[a], NUMBER_WORDS[b]) if in_words else (a, b)
        rows.append((f"What is {left} {operation} {right}?", number_answers(result), distractors[:3]))
    return rows


ARITHMETIC = arithmetic_rows() + [
    ("What is half of 9?", ["4.5", "four and a half"], ["4", "5", "3.5"]),
    ("What is 10 minus 15?", ["-5", "minus five", "negative five"], ["5", "-4", "-6"]),
    ("What is 0.5 plus 0.25?", ["0.75"], ["0.7", "0.55", "0.25"]),
    ("What is 9 squared?", number_answers(9 ** 2), ["18", "72", "99"]),
    ("What is the square root of 49?", number_answers(7), ["6", "8", "9"]),
    ("What is 2 to the power of 10?", number_answers(2 ** 10), ["20", "512", "1000"]),
    ("What is 25 percent of 200?", number_answers(200 // 4), ["25", "75", "100"]),
    ("What is double 35?", number_answers(2 * 35), ["60", "65", "75"]),
]

# --------------------------------------------------------------------------------------------
# words: opposites, plurals, past tenses, synonyms, numbers spelled out
# --------------------------------------------------------------------------------------------
OPPOSITES = [
    # (word, opposite answers, three wrong words)
    ("hot", ["cold"], ["warm", "wet", "dark"]),
    ("up", ["down"], ["over", "above", "high"]),
    ("big", ["small", "little"], ["large", "tall", "wide"]),
    ("happy", ["sad", "unhappy"], ["glad", "angry", "tired"]),
    ("fast", ["slow"], ["quick", "late", "weak"]),
    ("early", ["late"], ["soon", "first", "slow"]),
    ("young", ["old"], ["new", "small", "weak"]),
    ("north", ["south"], ["east", "west", "up"]),
    ("left", ["right"], ["centre", "back", "down"]),
    ("true", ["false"], ["real", "correct", "certain"]),
    ("full", ["empty"], ["half", "heavy", "open"]),
    ("wet", ["dry"], ["damp", "cold", "clean"]),
    ("push", ["pull"], ["press", "lift", "drop"]),
    ("buy", ["sell"], ["pay", "spend", "take"]),
    ("rich", ["poor"], ["cheap", "weak", "small"]),
    ("thick", ["thin"], ["wide", "short", "light"]),
    ("above", ["below", "beneath", "under"], ["over", "beside", "behind"]),
    ("win", ["lose"], ["draw", "play", "beat"]),
]
PLURALS = [
    ("child", ["children"], ["childs", "childes", "childrens"]),
    ("mouse", ["mice"], ["mouses", "mousen", "meese"]),
    ("foot", ["feet"], ["foots", "feets", "footen"]),
    ("tooth", ["teeth"], ["tooths", "teeths", "toothes"]),
    ("woman", ["women"], ["womans", "womens", "womanes"]),
    ("goose", ["geese"], ["gooses", "geeses", "goosen"]),
    ("sheep", ["sheep"], ["sheeps", "sheepes", "sheepen"]),
    ("ox", ["oxen"], ["oxes", "oxs", "oxies"]),
    ("leaf", ["leaves"], ["leafs", "leafes", "leavs"]),
    ("knife", ["knives"], ["knifes", "knifs", "knive"]),
    ("wolf", ["wolves"], ["wolfs", "wolfes", "wolvs"]),
    ("box", ["boxes"], ["boxs", "boxen", "bixes"]),
]
PAST_TENSES = [
    ("go", ["went"], ["goed", "goes", "wented"]),
    ("eat", ["ate"], ["eated", "eats", "aten"]),
    ("run", ["ran"], ["runned", "runs", "rung"]),
    ("see", ["saw"], ["seed", "sees", "sawed"]),
    ("write", ["wrote"], ["writed", "writes", "writted"]),
    ("swim", ["swam"], ["swimmed", "swims", "swimed"]),
    ("buy", ["bought"], ["buyed", "brought", "boughten"]),
    ("think", ["thought"], ["thinked", "thinks", "thank"]),
    ("take", ["took"], ["taked", "takes", "tooked"]),
    ("sing", ["sang"], ["sanged", "sings", "sunged"]),
    ("fly", ["flew"], ["flied", "flies", "flyed"]),
    ("teach", ["taught"], ["teached", "thought", "tought"]),
    ("catch", ["caught"], ["catched", "cought", "catcht"]),
    ("speak", ["spoke"], ["speaked", "speaks", "spoked"]),
]
SPELLED_NUMBERS = [
    # (number, its spelling, three wrong spellings or neighbours)
    (3, "three", ["thre", "thirty", "thirteen"]),
    (7, "seven", ["seventy", "sevan", "six"]),
    (11, "eleven", ["elevan", "twelve", "eleventy"]),
    (12, "twelve", ["twelf", "twenty", "twelv"]),
    (15, "fifteen", ["fiveteen", "fifty", "fivteen"]),
    (40, "forty", ["fourty", "fourteen", "fortie"]),
    (90, "ninety", ["ninty", "nineteen", "ninetey"]),
    (8, "eight", ["eigth", "eighty", "ate"]),
]

WORDS = (
    [(f'What is the opposite of "{word}"?', answers, wrong)
     for word, answers, wrong in OPPOSITES]
    + [(f'What is the plural of "{word}"?', answers, wrong) for word, answers, wrong in PLURALS]
    + [(f'What is the past tense of "{word}"?', answers, wrong)
       for word, answers, wrong in PAST_TENSES]
    + [(f"How is the number {number} written in words?", [spelling], wrong)
       for number, spelling, wrong in SPELLED_NUMBERS]
    + [
        ('Which word means the same as "large": big, tiny, thin or short?', ["big"],
         ["tiny", "thin", "short"]),
        ('Which word means the same as "begin": start, finish, stop or end?', ["start"],
         ["finish", "stop", "end"]),
        ('Which word means the same as "quick": fast, slow, late or heavy?', ["fast"],
         ["slow", "late", "heavy"]),
    ]
)

# --------------------------------------------------------------------------------------------
# science: biology, physics, astronomy basics
# --------------------------------------------------------------------------------------------
SCIENCE = [
    ("Which planet is closest to the Sun?", ["Mercury"], ["Venus", "Mars", "Earth"]),
    ("What is the largest planet in our solar system?", ["Jupiter"], ["Saturn", "Neptune", "Earth"]),
    ("Which planet is known as the Red Planet?", ["Mars"], ["Venus", "Jupiter", "Mercury"]),
    ("Which planet is famous for its large, bright ring system?", ["Saturn"],
     ["Mars", "Mercury", "Venus"]),
    ("Which planet has the hottest surface in our solar system?", ["Venus"],
     ["Mercury", "Mars", "Jupiter"]),
    ("How many planets are in our solar system?", number_answers(8), ["7", "9", "10"]),
    ("What is the name of the galaxy that contains our solar system?", ["Milky Way"],
     ["Andromeda", "Whirlpool", "Sombrero"]),
    ("What is the star at the centre of our solar system called?", ["Sun"],
     ["Sirius", "Polaris", "Moon"]),
    ("Which gas do plants take in from the air to make their food?",
     ["carbon dioxide", "CO2"], ["oxygen", "nitrogen", "helium"]),
    ("What gas do humans need to breathe in to stay alive?", ["oxygen"],
     ["nitrogen", "carbon dioxide", "hydrogen"]),
    ("What is the process by which plants use sunlight to make food called?",
     ["photosynthesis"], ["respiration", "digestion", "evaporation"]),
    ("Which organ pumps blood around the human body?", ["heart"], ["liver", "lungs", "brain"]),
    ("What is the largest organ of the human body?", ["skin"], ["liver", "heart", "brain"]),
    ("How many bones are in the adult human body?", number_answers(206),
     ["106", "212", "306"]),
    ("How many chambers does the human heart have?", number_answers(4), ["2", "3", "6"]),
    ("Which blood cells carry oxygen around the body?", ["red blood cells", "red cells"],
     ["white blood cells", "platelets", "nerve cells"]),
    ("Which part of a cell is known as its powerhouse?", ["mitochondria", "mitochondrion"],
     ["nucleus", "ribosome", "cell wall"]),
    ("What is the abbreviation for deoxyribonucleic acid?", ["DNA"], ["RNA", "ATP", "DHA"]),
    ("What is the hardest natural substance?", ["diamond"], ["quartz", "granite", "iron"]),
    ("What force pulls objects towards the Earth?", ["gravity", "gravitation"],
     ["magnetism", "friction", "inertia"]),
    ("Approximately how many kilometres per second does light travel in a vacuum?",
     ["300000"], ["30000", "3000", "3000000"]),
    ("What is the centre of an atom called?", ["nucleus"], ["electron", "proton", "shell"]),
    ("Which particle in an atom has a negative electric charge?", ["electron"],
     ["proton", "neutron", "nucleus"]),
    ("Which particle in an atom's nucleus has a positive electric charge?", ["proton"],
     ["electron", "neutron", "photon"]),
    ("Which particle in an atom's nucleus has no electric charge?", ["neutron"],
     ["proton", "electron", "ion"]),
    ("Who developed the theory of relativity?", ["Albert Einstein", "Einstein"],
     ["Isaac Newton", "Niels Bohr", "Galileo Galilei"]),
    ("Who wrote On the Origin of Species?", ["Charles Darwin", "Darwin"],
     ["Gregor Mendel", "Isaac Newton", "Louis Pasteur"]),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"],
     ["Louis Pasteur", "Marie Curie", "Edward Jenner"]),
    ("What does a thermometer measure?", ["temperature"], ["pressure", "weight", "speed"]),
    ("What type of animal is a whale?", ["mammal"], ["fish", "reptile", "amphibian"]),
    ("What type of animal is a frog?", ["amphibian"], ["reptile", "mammal", "fish"]),
    ("What type of animal is a snake?", ["reptile"], ["amphibian", "mammal", "fish"]),
    ("What is the fastest land animal?", ["cheetah"], ["lion", "horse", "greyhound"]),
    ("What is the largest animal alive today?", ["blue whale"],
     ["elephant", "giraffe", "whale shark"]),
    ("How many legs does an insect have?", number_answers(6), ["4", "8", "10"]),
]

# --------------------------------------------------------------------------------------------
# everyday: days, months, colours, animals, the body, shapes
# --------------------------------------------------------------------------------------------
EVERYDAY = [
    ("How many days are in a week?", number_answers(7), ["5", "6", "10"]),
    ("Which day of the week comes after Monday?", ["Tuesday"], ["Sunday", "Wednesday", "Friday"]),
    ("Which day of the week comes before Friday?", ["Thursday"],
     ["Saturday", "Wednesday", "Tuesday"]),
    ("Which month comes after March?", ["April"], ["February", "May", "June"]),
    ("What is the first month of the year?", ["January"], ["December", "February", "March"]),
    ("What is the last month of the year?", ["December"], ["November", "January", "October"]),
    ("How many months are in a year?", number_answers(12), ["10", "11", "13"]),
    ("Which month has the fewest days?", ["February"], ["April", "June", "November"]),
    ("How many days are in September?", number_answers(30), ["28", "29", "31"]),
    ("What colour is the sky on a clear day?", ["blue"], ["green", "red", "yellow"]),
    ("What colour do you get by mixing blue and yellow paint?", ["green"],
     ["purple", "orange", "brown"]),
    ("What colour do you get by mixing red and white paint?", ["pink"],
     ["purple", "orange", "grey"]),
    ("What colour is a ripe banana?", ["yellow"], ["red", "blue", "purple"]),
    ("What colour is fresh snow?", ["white"], ["black", "blue", "grey"]),
    ("Which farm animal says moo?", ["cow"], ["sheep", "pig", "horse"]),
    ("What is a baby dog called?", ["puppy", "pup"], ["kitten", "calf", "foal"]),
    ("What is a baby cat called?", ["kitten"], ["puppy", "cub", "lamb"]),
    ("What is a baby sheep called?", ["lamb"], ["calf", "kid", "foal"]),
    ("How many legs does a spider have?", number_answers(8), ["6", "4", "10"]),
    ("How many legs does a dog have?", number_answers(4), ["2", "6", "8"]),
    ("How many fingers, including the thumb, are on one human hand?", number_answers(5),
     ["4", "6", "10"]),
    ("Which organ of the body do we use to see?", ["eye", "eyes"], ["ear", "nose", "tongue"]),
    ("How many wheels does a bicycle have?", number_answers(2), ["1", "3", "4"]),
    ("How many sides does a triangle have?", number_answers(3), ["4", "5", "6"]),
    ("How many sides does a hexagon have?", number_answers(6), ["5", "7", "8"]),
    ("How many letters are in the English alphabet?", number_answers(26), ["24", "25", "28"]),
]

# category name, id prefix, rows
CATEGORIES = [
    ("geography", "geo", GEOGRAPHY),
    ("chemistry", "chem", CHEMISTRY),
    ("units", "unit", UNITS),
    ("dates", "date", [(q, year_answers(year), [str(y) for y in wrong]) for q, year, wrong in DATES]),
    ("arithmetic", "arith", ARITHMETIC),
    ("words", "word", WORDS),
    ("science", "sci", SCIENCE),
    ("everyday", "life", EVERYDAY),
]


def build() -> list[dict]:
    """All questions as records, correct option placed by a seeded, balanced shuffle."""
    records = []
    for category, prefix, rows in CATEGORIES:
        # equal counts of each position (up to one), in a seeded order: no position is a tell
        positions = [i % 4 for i in range(len(rows))]
        random.Random(f"prunekit-knowledge-{prefix}").shuffle(positions)
        for number, ((question, answers, distractors), position) in enumerate(zip(rows, positions), 1):
            if len(distractors) != 3:
                raise ValueError(f"{question!r}: needs 3 distractors, has {distractors}")
            choices = list(distractors)
            choices.insert(position, answers[0])
            records.append({"id": f"{prefix}-{number:03d}", "category": category,
                            "question": question, "answers": list(answers),
                            "choices": choices, "correct": position})
    return records


def write_jsonl(records: list[dict], out: Path) -> None:
    """Write one JSON object per line, atomically (temp file in the same folder, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    records = build()
    write_jsonl(records, out)
    counts = {}
    for record in records:
        counts[record["category"]] = counts.get(record["category"], 0) + 1
    print(f"wrote {len(records)} questions to {out}: {counts}")


if __name__ == "__main__":
    main(sys.argv)
