"""Generate the small, synthetic text data used by the build.

Writes three files next to this script, all UTF-8 with LF line endings:

* travel_qa.jsonl      -- ~320 travel Q&A records ({"prompt", "response"} per line),
                          the fine-tuning / evaluation dataset for the causal LM.
* tokenizer_corpus.txt -- ~2,500 lines of general travel prose plus broad everyday
                          vocabulary, used ONLY to train the BPE tokenizer.
* calibration.txt      -- 200 short travel paragraphs, one per line, used as AWQ
                          calibration text.

All prose comes from the hand-written city table and templates below; the only
randomness is random.Random with fixed seeds, so the output is byte-identical on
every run.  The outputs are committed to the repo; rerun this script only when you
deliberately want to change the data, and commit the regenerated files with it.

Usage: python data/make_data.py
"""

import json
import random
from pathlib import Path
from typing import NamedTuple

OUT_DIR = Path(__file__).resolve().parent


class City(NamedTuple):
    name: str
    country: str
    sight1: str
    sight2: str
    dish: str       # always used at the end of a clause
    season: str     # "from April to June", "in spring", ...
    why: str        # "when ..." clause that follows the season
    transport: str  # noun phrase: "the Métro", "trams and the U-Bahn"
    area: str       # a neighbourhood
    vibe: str       # "its ..." noun phrase describing the neighbourhood
    cost: str       # one of COST_DESC's keys
    tip: str        # a money-saving clause


CITIES = [
    City("Paris", "France", "the Eiffel Tower", "the Louvre", "a buttery croissant and a classic steak frites", "from April to June", "when the parks bloom and the evenings stay light", "the Métro", "Le Marais", "its medieval lanes, galleries and falafel shops", "expensive", "a museum pass and fixed-price lunch menus keep costs down"),
    City("London", "the United Kingdom", "the British Museum", "the Tower of London", "fish and chips", "from May to September", "when the days are long and the parks are at their best", "the Underground and the red double-decker buses", "Shoreditch", "its street art, markets and late-night bars", "expensive", "many major museums, including the British Museum, are free to enter"),
    City("Rome", "Italy", "the Colosseum", "the Vatican Museums", "cacio e pepe and a slice of pizza al taglio", "in April, May, September or October", "when it is warm but not scorching", "walking, with buses and a small metro for longer trips", "Trastevere", "its cobbled streets, ivy-covered walls and lively trattorias", "moderate", "a coffee drunk standing at the bar costs far less than one at a table"),
    City("Barcelona", "Spain", "the Sagrada Família", "Park Güell", "tapas and pa amb tomàquet, bread rubbed with tomato and olive oil", "in May, June or September", "when the sea is warm and the summer crowds are thinner", "the metro", "the Gothic Quarter", "its medieval alleys, hidden squares and old churches", "moderate", "the fixed-price menú del día at lunchtime is the best-value meal"),
    City("Amsterdam", "the Netherlands", "the Rijksmuseum", "the Anne Frank House", "stroopwafels and raw herring from a street stall", "in April and May", "when the tulips bloom in the nearby fields", "bicycles, with trams filling the gaps", "the Jordaan", "its canal-side houses, small galleries and cosy brown cafés", "expensive", "hotel prices drop noticeably on weeknights and in the colder months"),
    City("Berlin", "Germany", "the Brandenburg Gate", "the East Side Gallery", "currywurst and a late-night döner kebab", "from May to September", "when beer gardens and lakeside beaches come alive", "the U-Bahn and S-Bahn", "Kreuzberg", "its street food, canals and thriving nightlife", "moderate", "food and drink cost less than in most Western European capitals"),
    City("Prague", "the Czech Republic", "Charles Bridge", "Prague Castle", "goulash with bread dumplings and a Czech pilsner", "in spring and early autumn", "when the Old Town is pleasant to explore on foot", "trams", "Malá Strana", "its baroque palaces and quiet gardens below the castle", "affordable", "eating a few streets away from Old Town Square cuts restaurant bills sharply"),
    City("Vienna", "Austria", "Schönbrunn Palace", "St. Stephen's Cathedral", "Wiener Schnitzel and a slice of Sachertorte", "from April to June, or in December", "when the Christmas markets fill the squares", "the U-Bahn and the trams", "Neubau", "its independent boutiques, design shops and relaxed cafés", "moderate", "standing-room tickets at the State Opera cost a fraction of a seat"),
    City("Lisbon", "Portugal", "Belém Tower", "Jerónimos Monastery", "pastéis de nata, the famous custard tarts", "from March to May or in September and October", "when it is sunny but not too hot", "the historic Tram 28 and the metro", "Alfama", "its steep alleys, tiled houses and fado bars", "affordable", "prices have risen lately, but it is still one of the cheaper capitals in Western Europe"),
    City("Kraków", "Poland", "the Main Market Square", "Wawel Castle", "pierogi, dumplings filled with potato, cheese or meat", "from May to September", "when cafés spill out onto the squares", "walking and trams", "Kazimierz", "its historic Jewish quarter, synagogues and bohemian bars", "affordable", "a filling meal at a traditional milk bar costs very little"),
    City("Zürich", "Switzerland", "Lake Zürich", "the Grossmünster", "cheese fondue and Zürcher Geschnetzeltes, veal in a creamy sauce", "from June to August", "when locals swim in the lake and the river", "trams, which are frequent and punctual", "the Niederdorf", "its old-town lanes, guild houses and small bars", "very expensive", "the water from the city's many public fountains is free and safe to drink"),
    City("Reykjavik", "Iceland", "Hallgrímskirkja", "the Harpa concert hall", "Icelandic lamb soup and a hot dog from a harbour stand", "from June to August", "when the midnight sun makes the days almost endless", "walking in the compact centre and a rental car for day trips", "the Old Harbour", "its whale-watching boats, seafood restaurants and galleries", "very expensive", "buying groceries and refilling a bottle with tap water saves a lot"),
    City("Istanbul", "Turkey", "Hagia Sophia", "the Grand Bazaar", "a simit from a street cart and a plate of grilled kebab", "in April, May, September or October", "when the weather is mild and the Bosphorus sparkles", "trams and the ferries that cross the Bosphorus", "Beyoğlu", "its steep streets, rooftop bars and art galleries", "moderate", "an Istanbulkart travel card makes trams, buses and ferries much cheaper"),
    City("Athens", "Greece", "the Acropolis", "the Ancient Agora", "souvlaki and a Greek salad with feta", "from April to June or in September and October", "when it is warm enough for the beaches but not too hot", "the metro", "Plaka", "its narrow lanes and tavernas beneath the Acropolis", "moderate", "a combined ticket covers the Acropolis and several other ancient sites"),
    City("Dublin", "Ireland", "the Book of Kells at Trinity College", "the Guinness Storehouse", "a bowl of Irish stew", "from May to September", "when the days are longest and the parks are green", "walking, buses and the Luas tram", "Temple Bar", "its cobbled streets, live music and busy pubs", "expensive", "the national museums are free to visit"),
    City("Copenhagen", "Denmark", "Tivoli Gardens", "Nyhavn", "smørrebrød, open-faced rye sandwiches", "from June to August", "when the harbour baths open and the evenings are long", "bicycles and the driverless metro", "Vesterbro", "its former meatpacking district, restaurants and bars", "expensive", "street food markets are much cheaper than sit-down restaurants"),
    City("Stockholm", "Sweden", "the Vasa Museum", "Stockholm City Hall", "Swedish meatballs with lingonberries and a cinnamon bun", "from June to August", "when the archipelago is at its best", "the Tunnelbana metro, whose stations are decorated with art", "Södermalm", "its vintage shops, cafés and views over the water", "expensive", "the weekday set lunch, called dagens lunch, is the cheapest way to eat out"),
    City("Budapest", "Hungary", "the Hungarian Parliament Building", "the Széchenyi thermal baths", "goulash and lángos, fried dough topped with sour cream and cheese", "in spring and early autumn", "when the weather suits long walks along the Danube", "the metro and trams, including the scenic tram 2 along the river", "the Jewish Quarter", "its ruin bars, synagogues and street art", "affordable", "a Budapest Card covers public transport and gives discounts at many sights"),
    City("New York", "the United States", "Central Park", "the Metropolitan Museum of Art", "a New York bagel and a thin-crust pizza slice", "from April to June or in September and October", "when the weather is ideal for walking", "the subway, which runs 24 hours a day", "Greenwich Village", "its brownstones, jazz clubs and leafy streets", "very expensive", "the Staten Island Ferry is free and passes the Statue of Liberty"),
    City("Chicago", "the United States", "the Art Institute of Chicago", "Millennium Park", "deep-dish pizza and a Chicago-style hot dog", "from June to September", "when the lakefront and summer festivals are in full swing", "the L trains", "Wicker Park", "its record stores, bars and indie boutiques", "moderate", "Millennium Park and the Lakefront Trail are free to enjoy"),
    City("San Francisco", "the United States", "the Golden Gate Bridge", "Alcatraz Island", "sourdough bread and a Mission-style burrito", "in September and October", "when the summer fog usually clears", "Muni buses, BART and the famous cable cars", "the Mission District", "its murals, taquerías and sunny Dolores Park", "very expensive", "walking across the Golden Gate Bridge costs nothing"),
    City("New Orleans", "the United States", "the French Quarter", "the National WWII Museum", "gumbo and beignets dusted with powdered sugar", "from February to May", "when the weather is pleasant and festivals like Mardi Gras take place", "the historic streetcars", "the Marigny", "its colourful cottages and the live music on Frenchmen Street", "moderate", "plenty of great live music can be heard for the price of a drink"),
    City("Mexico City", "Mexico", "the Zócalo", "the National Museum of Anthropology", "tacos al pastor from a street stand", "from March to May", "when it is dry and warm before the rainy season", "the metro, which is cheap and extensive", "Coyoacán", "its colourful streets and the Frida Kahlo Museum", "affordable", "street food is delicious and costs very little"),
    City("São Paulo", "Brazil", "Avenida Paulista", "the São Paulo Museum of Art", "feijoada and a pastel from a street market", "from April to September", "when the weather is drier and milder", "the metro", "Vila Madalena", "its street art, bars and the murals of Beco do Batman", "moderate", "on Sundays Avenida Paulista closes to cars and becomes a free street party"),
    City("Buenos Aires", "Argentina", "the Recoleta Cemetery", "Teatro Colón", "a grilled steak at a parrilla and a couple of empanadas", "from September to November", "when the jacaranda trees bloom", "the Subte metro and the buses", "San Telmo", "its antique market, tango halls and colonial streets", "affordable", "a set lunch menu at a neighbourhood café is great value"),
    City("Cusco", "Peru", "the Plaza de Armas", "the fortress of Sacsayhuamán", "lomo saltado and a cup of coca tea", "from May to September", "when the dry season makes treks to Machu Picchu easier", "walking and cheap taxis", "San Blas", "its steep streets, artisan workshops and views over the city", "affordable", "the tourist ticket, or boleto turístico, covers many sites in and around the city"),
    City("Vancouver", "Canada", "Stanley Park", "Granville Island", "fresh Pacific salmon and sushi", "from June to September", "when it is sunny and dry", "the SkyTrain and the SeaBus", "Gastown", "its cobbled streets, steam clock and restaurants", "expensive", "the seawall around Stanley Park is free to walk or cycle"),
    City("Montréal", "Canada", "the Notre-Dame Basilica", "Mount Royal", "poutine and a Montréal-style bagel", "from June to September", "when the city fills with festivals", "the metro", "the Plateau Mont-Royal", "its colourful outdoor staircases, cafés and bookshops", "moderate", "bring-your-own-wine restaurants keep dinner bills down"),
    City("Tokyo", "Japan", "Sensō-ji Temple", "the Meiji Shrine", "fresh sushi and a bowl of ramen", "from late March to April or in November", "when cherry blossoms or autumn leaves colour the city", "trains and the subway, which are clean and punctual", "Shimokitazawa", "its vintage clothing stores, tiny theatres and cafés", "moderate", "convenience store meals and standing noodle bars are cheap and good"),
    City("Kyoto", "Japan", "Fushimi Inari Shrine", "the Golden Pavilion of Kinkaku-ji", "kaiseki cuisine and yudofu, simmered tofu", "in early April or in November", "when the cherry blossoms or maples are at their peak", "city buses, bicycles and walking", "Gion", "its wooden teahouses and traditional streets", "moderate", "many temples charge only a small entry fee"),
    City("Seoul", "South Korea", "Gyeongbokgung Palace", "N Seoul Tower", "bibimbap and Korean barbecue", "in spring or autumn", "when the weather is mild and the palace gardens are colourful", "the subway, which is cheap and signposted in English", "Bukchon Hanok Village", "its traditional wooden houses between the palaces", "moderate", "wearing a hanbok gets you free entry to the main palaces"),
    City("Bangkok", "Thailand", "the Grand Palace", "Wat Arun", "pad thai and som tam, a spicy papaya salad", "from November to February", "when the weather is cooler and drier", "the BTS Skytrain and the river boats on the Chao Phraya", "Chinatown", "its neon signs, markets and street food stalls", "affordable", "street food is excellent and costs only a dollar or two per dish"),
    City("Singapore", "Southeast Asia", "Gardens by the Bay", "Marina Bay Sands", "Hainanese chicken rice and chilli crab", "from February to April", "when rainfall is usually lower", "the MRT", "Kampong Glam", "its grand mosque, murals and independent shops", "expensive", "hawker centres serve excellent meals for a few dollars"),
    City("Hanoi", "Vietnam", "Hoan Kiem Lake", "the Temple of Literature", "phở and bún chả", "from October to December", "when the air is cool and dry", "walking and ride-hailing motorbikes", "the Old Quarter", "its busy streets named after the goods once sold there", "affordable", "a bowl of phở from a street stall costs very little"),
    City("Hong Kong", "southern China", "Victoria Peak", "the Tian Tan Buddha on Lantau Island", "dim sum and egg tarts", "from October to December", "when skies are clear and the humidity drops", "the MTR and the old double-decker trams", "Sheung Wan", "its dried seafood shops, temples and galleries", "expensive", "the Star Ferry across the harbour costs only a few dollars"),
    City("Mumbai", "India", "the Gateway of India", "Chhatrapati Shivaji Maharaj Terminus", "vada pav and pav bhaji", "from November to February", "when it is dry and less humid", "the local trains and black-and-yellow taxis", "Colaba", "its cafés, markets and colonial buildings", "affordable", "local train tickets cost just a few rupees"),
    City("Marrakech", "Morocco", "Jemaa el-Fnaa", "the Majorelle Garden", "a slow-cooked tagine and a glass of mint tea", "from March to May or in October and November", "when days are warm but not scorching", "walking in the medina and petit taxis for longer trips", "the medina", "its souks, riads and hidden courtyards", "affordable", "agreeing on a taxi fare before setting off avoids surprises"),
    City("Cairo", "Egypt", "the Pyramids of Giza", "the Egyptian Museum", "koshari, a hearty mix of rice, lentils and pasta", "from October to April", "when temperatures are comfortable", "the metro and ride-hailing apps", "Zamalek", "its leafy streets on an island in the Nile", "affordable", "ride-hailing apps avoid haggling over taxi fares"),
    City("Cape Town", "South Africa", "Table Mountain", "Robben Island", "bobotie, a spiced minced-meat bake", "from November to March", "when the summer is warm and dry", "ride-hailing apps and the MyCiTi buses", "the Bo-Kaap", "its brightly painted houses and Cape Malay cooking", "moderate", "wine tasting in the nearby winelands is great value"),
    City("Sydney", "Australia", "the Sydney Opera House", "Bondi Beach", "a meat pie and fresh seafood from the fish market", "from September to November or from March to May", "when it is warm but not too hot", "trains and harbour ferries", "Surry Hills", "its cafés, restaurants and terrace houses", "expensive", "the ferry to Manly doubles as a cheap harbour cruise"),
]

COST_DESC = {
    "very expensive": "one of the priciest destinations you can visit, so budget carefully",
    "expensive": "on the expensive side, especially for hotels and dining out",
    "moderate": "moderately priced, with costs similar to many other big cities",
    "affordable": "good value, and your money will go a long way there",
}


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def fill(template: str, c: City) -> str:
    """Format a template with the city's fields; {X_} gives the capitalised field."""
    fields = c._asdict()
    fields.update({k + "_": cap(v) for k, v in c._asdict().items()})
    fields["cost_desc"] = COST_DESC[c.cost]
    return template.format(**fields)


# ---------------------------------------------------------------- travel_qa.jsonl
# topic -> (prompt phrasings, answer templates); every city gets one record per topic.
QA_TOPICS = {
    "must_see": (
        ["What's a must-see in {name}?", "What is the best thing to see in {name}?",
         "If I only have one day in {name}, what should I see?", "Which landmark should I not miss in {name}?"],
        ["You shouldn't miss {sight1}. A visit to {sight2} is also worthwhile if you have time, and a wander through {area} is a lovely way to end the day.",
         "For most visitors to {name}, the highlight is {sight1}. Arrive early to beat the crowds, then spend the afternoon at {sight2}."]),
    "best_time": (
        ["When is the best time to visit {name}?", "What time of year should I go to {name}?",
         "Which season is best for a trip to {name}?", "When should I plan a trip to {name}?"],
        ["The best time to visit {name} is {season}, {why}. Travelling just outside the peak also means lower hotel prices and fewer crowds around {sight1}.",
         "Most travellers agree that {name} is at its best {season}, {why}. You can enjoy it at other times of year too, just pack for the weather."]),
    "food": (
        ["What local food should I try in {name}?", "What should I eat on a trip to {name}?",
         "What dish is {name} famous for?", "Any food recommendations for a first visit to {name}?"],
        ["Don't leave {name} without trying {dish}. {area_} is full of good local places to eat, and the best of them are often small, family-run spots.",
         "In {name}, look out for {dish}. Eating where the locals queue is usually the best way to find the real thing."]),
    "transport": (
        ["How do I get around in {name}?", "What's the easiest way to get around {name}?",
         "Is public transport good in {name}?", "What's the best way to travel between sights in {name}?"],
        ["To get around {name}, most visitors rely on {transport}. Comfortable shoes help too, because the central areas are best explored on foot.",
         "In {name}, getting around mostly means {transport}. Plan your day by area, for example {sight1} in the morning and {area} later on."]),
    "cost": (
        ["Is {name} an expensive city to visit?", "How expensive is a trip to {name}?",
         "Is {name} a good destination for travellers on a budget?", "How much money will I need in {name}?"],
        ["{name} is {cost_desc}. A useful tip: {tip}.",
         "For most travellers, {name} is {cost_desc}. To save money, remember that {tip}."]),
    "stay": (
        ["Which neighbourhood should I stay in when visiting {name}?", "Where should I stay in {name}?",
         "What's a good area to explore in {name}?", "Which part of {name} has the most character?"],
        ["{area_} is a great choice, known for {vibe}. It also makes a convenient base for reaching {sight1}.",
         "Try {area}, a favourite with visitors thanks to {vibe}. It's a pleasant place to wander at any time of day, from morning coffee to a late dinner."]),
    "itinerary": (
        ["How should I spend a day in {name}?", "Can you suggest a one-day itinerary for {name}?",
         "I have 24 hours in {name}. What should I do?"],
        ["Start the morning at {sight1}, then spend the afternoon at {sight2}. In the evening, head to {area} for dinner and try {dish}.",
         "Begin with {sight2} while it is quiet, and move on to {sight1} after lunch. Finish the day in {area}, ideally with {dish}."]),
    "overview": (
        ["Why should I visit {name}?", "What makes {name} worth visiting?",
         "Is {name} worth a trip?", "What is {name} best known for?"],
        ["{name} is known for {sight1} and {sight2}, as well as {dish}. For the best experience, visit {season}.",
         "{name}, in {country}, combines famous sights like {sight1} with neighbourhoods such as {area}. The food alone is worth the trip, especially {dish}."]),
}


def make_qa() -> list[dict]:
    rng = random.Random(20240601)
    records = []
    for city in CITIES:
        for prompts, answers in QA_TOPICS.values():
            rec = {"prompt": fill(rng.choice(prompts), city), "response": fill(rng.choice(answers), city)}
            p_words, r_words = len(rec["prompt"].split()), len(rec["response"].split())
            assert 5 <= p_words <= 20 and 20 <= r_words <= 60, (p_words, r_words, rec)
            records.append(rec)
    rng.shuffle(records)
    return records


# ------------------------------------------------------------ tokenizer_corpus.txt
DESCRIPTIONS = [
    "{name} is a city in {country}, and one of its best-known landmarks is {sight1}.",
    "Travellers who come to {name} often spend a whole morning at {sight2}.",
    "The neighbourhood of {area} is admired for {vibe}.",
    "Many residents of {name} say that {area} has changed a great deal over the last twenty years.",
    "Local cooks in {name} take pride in {dish}.",
    "Many people think {name} is at its most appealing {season}, {why}.",
    "Public transport in {name} includes {transport}.",
    "Guidebooks say that {name} is {cost_desc}.",
    "Budget travellers in {name} have learned that {tip}.",
    "A walk from {sight1} towards {area} shows two very different sides of {name}.",
    "Photographers return to {sight2} again and again, hoping for soft evening light.",
    "The people of {name} are proud of their history, and {sight1} is part of that story.",
    "Markets, bakeries and small cafés shape daily life in {area}.",
    "A week in {name} leaves time for {sight1}, {sight2} and slow afternoons in {area}.",
    "Outside the busy season, {name} feels calmer and hotel rooms are easier to find.",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAY_PLANS = [
    "A {weekday} in {month} in {cityname} could begin at {sight} and end with dinner in {area}.",
    "Our {ordinal} visit to {cityname} was in {month}, and we arrived on a quiet {weekday} evening.",
    "Last {month}, a friend spent {count} days in {cityname} and still wanted more time at {sight}.",
]
SUBJECTS = ["Many travellers", "My parents", "Most tour guides", "Retired teachers", "Two students",
            "The children", "Most visitors", "My neighbours", "A few backpackers", "Business travellers"]
MODALS = ["plan to", "want to", "usually", "often", "sometimes", "like to", "hope to", "prefer to", "tend to", "never"]
ACTIONS = [
    "book a room", "catch the early train", "pack a light jacket", "buy a city map", "change some money",
    "check the opening hours", "carry a water bottle", "learn a few local words", "try the street food",
    "rent a bicycle", "climb the old tower", "visit the art museum", "walk along the river", "send a postcard",
    "call the hotel", "print the tickets", "charge their phone", "ask for directions", "read the guidebook",
    "take a long nap", "order a strong coffee", "find a quiet bench", "watch the sunset", "meet an old friend",
    "write in a travel journal", "photograph the harbour", "cross the bridge", "follow the coastal path",
    "join a walking tour", "avoid the crowds", "leave a small tip", "compare the prices", "wait for the bus",
    "sleep on the night train", "cook a simple dinner", "explore the side streets", "listen to a street musician",
    "buy fresh fruit", "return the rental car", "pay by card", "cancel the reservation", "share a taxi",
    "choose a window seat", "open the suitcase", "carry an umbrella", "hike up the hill",
    "swim in the lake", "count the coins", "measure the distance", "sing an old song", "draw a quick sketch",
]
WHENS = ["before breakfast", "after lunch", "in the late afternoon", "on Sunday mornings", "around midnight",
         "during the holidays", "in the summer", "at the weekend", "before the rain starts", "after the museum closes",
         "in early spring", "in the depths of winter", "on the last day of a trip", "while it is still dark", "in a hurry"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]


def number_words(n: int) -> str:
    """Spell out 0 <= n < 10000 in British English."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")
    rest = n % 1000
    joiner = " and " if 0 < rest < 100 else " "
    return number_words(n // 1000) + " thousand" + (joiner + number_words(rest) if rest else "")


def make_corpus() -> list[str]:
    rng = random.Random(7)
    lines = [fill(t, c) for c in CITIES for t in DESCRIPTIONS]
    for c in CITIES:
        for month in MONTHS:
            lines.append(rng.choice(DAY_PLANS).format(
                weekday=rng.choice(WEEKDAYS), month=month, cityname=c.name, area=c.area,
                sight=rng.choice([c.sight1, c.sight2]), ordinal=rng.choice(ORDINALS), count=number_words(rng.randint(2, 9))))
    for n in list(range(0, 301)) + sorted(rng.sample(range(301, 10000), 100)):
        lines.append(rng.choice([
            "The number {n} is written as {w}.", "The ticket cost {n} coins, or {w} in words.",
            "We walked {w} kilometres, which the map showed as {n} km.", "Room {n} is on the {f} floor.",
        ]).format(n=n, w=number_words(n), f=ORDINALS[n % 5]))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        lines += [f"{month} is month number {number_words(i + 1)} of the year, and {nxt} comes after it.",
                  f"In {month} the days feel different in the north and in the south of the world.",
                  f"Prices for flights often change in {month}, so it pays to compare them early."]
    for i, day in enumerate(WEEKDAYS):
        nxt = WEEKDAYS[(i + 1) % 7]
        lines += [f"{day} is followed by {nxt}, and many shops keep different hours on each.",
                  f"Some museums close on {day}, while others stay open late.",
                  f"The market near the station is busiest on {day} mornings."]
    for _ in range(900):
        lines.append(f"{rng.choice(SUBJECTS)} {rng.choice(MODALS)} {rng.choice(ACTIONS)} {rng.choice(WHENS)}.")
    return list(dict.fromkeys(lines))  # drop repeats, keep first-seen order


# ----------------------------------------------------------------- calibration.txt
PARAGRAPHS = [
    "On our first morning in {name}, we set out early for {sight1} and were glad we did. By lunchtime the crowds had grown, so we slipped away to {area} for something to eat.",
    "{name} rewards slow travel. Rather than rushing between sights, spend an afternoon in {area} and let the city set the pace. Locals are usually happy to point you towards their favourite café.",
    "The guidebooks all mention {sight2}, and for good reason. Go early, bring water and leave time afterwards to rest. Then reward yourself with {dish}.",
    "Friends had told us that {name} is loveliest {season}, {why}, so that is when we went. Every walk was a pleasure, and even the busiest streets around {sight1} felt relaxed.",
    "Getting around {name} turned out to be simpler than we expected. We relied mostly on {transport}. Keeping a little cash on hand helped with small purchases. A tip for next time: {tip}.",
]


def make_calibration() -> list[str]:
    return [fill(p, c) for c in CITIES for p in PARAGRAPHS]


def write_lines(path: Path, lines: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    qa = make_qa()
    corpus = make_corpus()
    calibration = make_calibration()
    corpus_text = "\n".join(corpus)
    for rec in qa:  # the tokenizer corpus must not contain the Q&A text verbatim
        assert rec["prompt"] not in corpus_text and rec["response"] not in corpus_text, rec
    write_lines(OUT_DIR / "travel_qa.jsonl", [json.dumps(r, ensure_ascii=False) for r in qa])
    write_lines(OUT_DIR / "tokenizer_corpus.txt", corpus)
    write_lines(OUT_DIR / "calibration.txt", calibration)
    print(f"wrote {len(qa)} Q&A records, {len(corpus)} corpus lines, {len(calibration)} calibration lines to {OUT_DIR}")


if __name__ == "__main__":
    main()
