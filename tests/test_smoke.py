import openai
from tests.payloads import OPENAI_BASIC


async def test_openai_client_through_proxy(ledger, upstream):
    client = openai.AsyncOpenAI(base_url=ledger.url + "/v1", api_key="sk-test-secret-123", max_retries=0)
    completion = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert completion.id == OPENAI_BASIC["id"]
    row = await ledger.row()
    print(row)
    assert row["completion_id"] == OPENAI_BASIC["id"]
    assert row["prompt_tokens"] == 1117
    await client.close()
