from tests.images import png


async def test_classify_png(client):
    response = await client.post("/classify", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 5
    print(body, response.headers)
