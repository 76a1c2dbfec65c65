import openai
from tests.payloads import openai_stream, openrouter_stream, midstream_error_stream
from tests.upstream import sse_reply


async def test_stream(ledger, upstream):
    upstream.add("s", sse_reply(openai_stream(True), delay=0.001))
    client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-x", max_retries=0,
                                default_headers={"X-Fake-Scenario": "s"})
    stream = await client.chat.completions.create(model="gpt-4o", messages=[], stream=True)
    chunks = [c async for c in stream]
    print(len(chunks), [len(c.choices) for c in chunks])
    assert all(c.choices for c in chunks)
    row = await ledger.row()
    print(row)
    print(upstream.requests[0].body)
    await client.close()

async def test_or(ledger, upstream):
    upstream.add("s", sse_reply(openrouter_stream(), delay=0.001))
    upstream.add("e", sse_reply(midstream_error_stream(), delay=0.001))
    from openrouter import OpenRouter
    async with OpenRouter(api_key="sk-or-x", server_url=ledger.url + "/api/v1") as c:
        res = await c.chat.send_async(model="google/gemini-2.5-pro", messages=[{"role":"user","content":"hi"}], stream=True, http_headers={"X-Fake-Scenario": "s"})
        async with res as ev:
            got = [e async for e in ev]
        print(len(got))
    row = await ledger.row()
    print(row)
