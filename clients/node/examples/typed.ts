// Compiled (not run) by `npm run typecheck`: the client's types as a TypeScript user sees them.
import { connect, VoicemeshError } from '../src/index';

export async function typed(addr: string): Promise<string[]> {
  const client = connect(addr, { apiKey: 'secret', tls: { caFile: 'ca.pem', serverName: 'orchestrator.example' } });
  const session = await client.start({
    systemPrompt: 'Be brief.',
    inputFormat: { encoding: 'AUDIO_ENCODING_PCM16', sampleRateHz: 16000 },
    tools: [{ name: 'get_weather', description: 'Weather in a city', parameters: { type: 'object' } }],
  });
  session.sendText('weather in Paris');
  const said: string[] = [];
  try {
    for await (const ev of session) {
      if (ev.event === 'toolCall' && ev.toolCall) session.sendToolResult(ev.toolCall.id, { sky: 'sunny' });
      if (ev.event === 'botText' && ev.botText) said.push(ev.botText.text);
      if (ev.event === 'turnEnded') await session.end();
    }
  } catch (err) {
    if (err instanceof VoicemeshError) said.push(err.codeName);
  }
  client.close();
  return said;
}
